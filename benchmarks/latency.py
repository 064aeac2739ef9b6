"""Latency as a client hears it, on the official moshi server and on `openmoshi serve`, in one run.

    python benchmarks/latency.py                       # CPU: real-size Mimi, the small LM, float32
    python benchmarks/latency.py --conversations 1,2,4 --seconds 20 --json out.json
    python benchmarks/latency.py --servers openmoshi --flags "--max-sessions 4"

Both servers load the same random checkpoint in the official layout (a real-size Mimi with random
codebooks, an LM of `--lm` size). The same client plays real speech (espeak-ng) in real time to
each, one server after the other, and for every chunk of audio that comes back takes its arrival
time minus the time it had sent the input the model needed for it (`openmoshi.serving.latency`:
the input up to the same sample, plus one frame). Printed per server and number of conversations:
p50 and p90, and the p90 of the first and last thirds of each conversation (a server that falls
behind real time shows a growing last third). Several conversations start at staggered phases
(conversation i starts i/N of a frame after the first); the official server serves one at a time,
so it is measured with one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving_utils import ROOT, free_port, server_log, start_server, stop_server, wait_ready

FRAME_S = 0.08


def checkpoint(folder: Path, lm: str, mimi: str = "real") -> Path:
    """The random checkpoint both servers load (official layout, config.json with file names)."""
    from infer_utils import MOSHI, SMALL, make_checkpoint

    make_checkpoint(folder, "moshi", seed=0, lm_kwargs={"tiny": MOSHI, "small": SMALL}[lm], small_mimi=mimi == "small")
    return folder


def start_official(folder: Path, port: int, device: str, dtype: str, threads: int | None) -> subprocess.Popen:
    cfg = json.loads((folder / "config.json").read_text())
    config = folder / "config.json"
    if "mimi_config_name" in cfg:  # the official loader fetches it from its hub repo unless told it is a file
        config = folder / "config.official.json"
        config.write_text(json.dumps({**cfg, "mimi_config_name": f"file://{folder.resolve() / cfg['mimi_config_name']}"}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "official_server.py"), "--dtype", dtype, "--",
           "--moshi-weight", str(folder / cfg["moshi_name"]), "--mimi-weight", str(folder / cfg["mimi_name"]),
           "--tokenizer", str(folder / cfg["tokenizer_name"]), "--config-path", str(config),
           "--device", device, "--static", "none", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log = tempfile.NamedTemporaryFile("w+", prefix="official-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    return proc


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """The official server has no health route: it listens once its model is loaded and warm."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the official server exited: {server_log(proc)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            await asyncio.sleep(0.5)
    raise RuntimeError("the official server did not listen in time")


async def converse(url: str, pcm: np.ndarray, delay: float) -> dict:
    from openmoshi.serving.client import talk_file
    from openmoshi.serving.latency import LatencyMeter

    await asyncio.sleep(delay)
    meter = LatencyMeter()
    result = await talk_file(url, pcm, tail_s=3.0, meter=meter)
    return {**meter.summary(), "seconds_sent": round(result.seconds_sent, 2),
            "seconds_received": round(result.seconds_received, 2), "errors": list(result.errors)}


async def measure(url: str, pcm: np.ndarray, n: int) -> dict:
    runs = await asyncio.gather(*(converse(url, pcm, i * FRAME_S / n) for i in range(n)))
    keys = ("p50_ms", "p90_ms", "first_third_p90_ms", "last_third_p90_ms")
    worst = {k: max(r.get(k, float("inf")) for r in runs) for k in keys}
    return {"conversations": n, "worst": worst, "each": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="official,openmoshi", help="which servers, in this order")
    p.add_argument("--conversations", default="1,2", help="conversations at once on openmoshi (official: 1)")
    p.add_argument("--seconds", type=float, default=20.0, help="speech played per conversation")
    p.add_argument("--lm", choices=("tiny", "small"), default="small", help="LM size")
    p.add_argument("--mimi", choices=("real", "small"), default="real",
                   help="Mimi: real-size (random weights), or the tests' small one (where a CPU has room for "
                        "several conversations)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both servers (default: theirs)")
    p.add_argument("--flags", default="", help="extra flags for openmoshi serve")
    p.add_argument("--checkpoint", type=Path, default=None, help="reuse this folder (made when missing)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from official_utils import speech

    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix="openmoshi-latency-")) / "model"
    if not (folder / "config.json").exists():
        checkpoint(folder, args.lm, args.mimi)
    pcm = speech(args.seconds).numpy()
    counts = [int(n) for n in args.conversations.split(",")]
    rows = []
    for name in args.servers.split(","):
        port = free_port()
        if name == "official":
            proc = start_official(folder, port, args.device, args.dtype, args.threads)
            ready = wait_listening(port, proc)
        else:
            flags = ["--device", args.device, "--dtype", args.dtype, *shlex.split(args.flags)]
            proc = start_server(folder, port, *flags, threads=args.threads)
            ready = wait_ready(port, proc)
        try:
            asyncio.run(ready)
            for n in (counts[:1] if name == "official" else counts):
                if name == "official" and n != 1:
                    continue
                row = {"server": name, **asyncio.run(measure(f"ws://127.0.0.1:{port}", pcm, n))}
                rows.append(row)
                w = row["worst"]
                print(f"{name:9s} x{n}: p50 {w['p50_ms']:7.1f} ms  p90 {w['p90_ms']:7.1f} ms  first third p90 "
                      f"{w['first_third_p90_ms']:7.1f} ms  last third p90 {w['last_third_p90_ms']:7.1f} ms", flush=True)
        finally:
            stop_server(proc)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu": _cpu_model(), "args": vars(args) | {"checkpoint": str(folder), "json": str(args.json)}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
