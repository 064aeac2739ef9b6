"""Shared by the serving benchmarks: a real `openmoshi serve` subprocess on a tiny random checkpoint
(the one the tests build), its readiness, its memory, and a free port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny checkpoint builder the tests use


def tiny_checkpoint(folder: Path) -> Path:
    from server_utils import tiny_checkpoint as build

    return build(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, *flags: str, env: dict | None = None, threads: int | None = 1) -> subprocess.Popen:
    """`openmoshi serve` on `folder` (CPU, `threads` torch threads: one by default, None: torch's,
    text logs) with extra `flags` (and `env`); a later --device in `flags` wins."""
    cmd = [sys.executable, "-m", "openmoshi", "serve", "--hf-repo", str(folder), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--log-format", "text",
           *(["--threads", str(threads)] if threads else []), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
           **(env or {})}
    log = tempfile.NamedTemporaryFile("w+", prefix="openmoshi-serve-", suffix=".log", delete=False)
    # Its log goes to a file: a pipe nobody reads would fill and block the server's event loop.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = log.name
    return proc


def server_log(proc: subprocess.Popen, tail: int = 3000) -> str:
    return Path(proc.log_path).read_text()[-tail:]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {server_log(proc)}")
            try:
                async with s.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server not ready in time")


async def health(port: int) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/health") as r:
            return await r.json()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
