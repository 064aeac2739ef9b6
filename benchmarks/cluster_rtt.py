"""What Ray Serve adds: round trips through `openmoshi serve --replicas 1` (with Ray's Python proxy,
and with its HAProxy mode) against the same server run directly on uvicorn (`openmoshi serve`), all
as real subprocesses on this machine,
with 1, 8 and 32 conversations streaming audio in real time (tiny random models, CPU).

A round trip is a ping message (protocol kind 6) sent on a conversation's websocket and its echo
back, while that conversation and the others stream Opus both ways: it crosses the same path as a
frame (client -> proxy -> replica's event loop -> proxy -> client) without the model step, which
is the same on both paths. Also printed: messages per second through the server (both ways), and
frames the clients received against frames sent.

    python benchmarks/cluster_rtt.py --conversations 1 8 32 --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import sphn

from serving_utils import free_port, start_server as start, stop_server, tiny_checkpoint, wait_ready

FRAME, RATE = 1920, 24000


def start_server(folder: Path, port: int, sessions: int, path: str) -> subprocess.Popen:
    flags = ["--max-sessions", str(sessions), "--queue", "0"]
    if path != "uvicorn":  # ray: Ray Serve's Python proxy actor; ray-haproxy: its HAProxy mode
        flags += ["--replicas", "1", "--ray-proxy", "haproxy" if path == "ray-haproxy" else "python"]
    return start(folder, port, *flags)


async def conversation(url: str, seconds: float, rtts: list, counts: dict) -> None:
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    rng = np.random.default_rng(0)
    pending: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            first = await ws.receive(timeout=30)
            if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != b"\x00":
                counts["refused"] += 1
                return

            async def receive():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    counts["in"] += 1
                    kind = msg.data[0]
                    if kind == 6 and pending:
                        rtts.append(time.perf_counter() - pending.pop(0))
                    elif kind == 1:
                        counts["samples"] += reader.append_bytes(msg.data[1:]).shape[-1]

            receiver = asyncio.create_task(receive())
            start, n = time.monotonic(), int(seconds / 0.08)
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i * 0.08 - time.monotonic()))
                page = writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                if page:
                    await ws.send_bytes(b"\x01" + page)
                    counts["out"] += 1
                counts["frames_sent"] += 1
                if i % 6 == 3:  # a ping every ~0.5 s, between audio messages
                    pending.append(time.perf_counter())
                    await ws.send_bytes(b"\x06")
                    counts["out"] += 1
            await asyncio.sleep(1.0)
            receiver.cancel()


async def measure(port: int, conversations: int, seconds: float) -> dict:
    rtts: list[float] = []
    counts = dict(out=0, samples=0, frames_sent=0, refused=0, **{"in": 0})
    url = f"ws://127.0.0.1:{port}/api/chat"
    start = time.monotonic()
    await asyncio.gather(*(conversation(url, seconds, rtts, counts) for _ in range(conversations)))
    took = time.monotonic() - start
    ms = np.array(rtts) * 1000
    return {"conversations": conversations, "pings": len(ms),
            "rtt_p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "rtt_p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "messages_per_s": round((counts["in"] + counts["out"]) / took, 1),
            "frames_sent": counts["frames_sent"], "frames_received": counts["samples"] // FRAME,
            "refused": counts["refused"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--paths", nargs="+", default=["uvicorn", "ray", "ray-haproxy"],
                   choices=["uvicorn", "ray", "ray-haproxy"])
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_checkpoint(Path(tmp) / "model")
        for path in args.paths:
            port = free_port()
            proc = start_server(folder, port, max(args.conversations), path)
            try:
                asyncio.run(wait_ready(port, proc))
                for n in args.conversations:
                    time.sleep(3.0)  # the previous run's conversations have left their slots
                    row = {"path": path, **asyncio.run(measure(port, n, args.seconds))}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                stop_server(proc)
    by = {(r["path"], r["conversations"]): r for r in rows}
    for n in args.conversations:
        for path in ("ray", "ray-haproxy"):
            if (path, n) in by and ("uvicorn", n) in by and by[(path, n)]["rtt_p99_ms"] is not None:
                added = by[(path, n)]["rtt_p99_ms"] - by[("uvicorn", n)]["rtt_p99_ms"]
                print(f"{n} conversations: {path} adds {added:.2f} ms at p99 "
                      f"(p50 {by[(path, n)]['rtt_p50_ms'] - by[('uvicorn', n)]['rtt_p50_ms']:.2f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
