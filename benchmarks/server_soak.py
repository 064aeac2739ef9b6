"""Reliability figures of `openmoshi serve` (a real subprocess, tiny random models, CPU):

    fuzz   MESSAGES generated and mutated messages (random bytes, unknown kinds, truncated and
           corrupt Ogg pages, huge and empty frames, text frames, client-only kinds, floods of
           valid audio) from several connections that reconnect whenever the server closes them,
           beside one normal conversation: crashes (0), stuck slots after (0: /health active == 1
           then 0), and the normal conversation's frames in and out (it must keep every one).
    long   one conversation of FRAMES frames (45,000 = 1 hour of audio) fed faster than real time
           on the input clock (`--clock input`, a frame when the client has sent one, so nothing is
           dropped): it keeps answering past the context window, and the server's memory (RSS) at
           the end against after the first minute of audio.
    many   CONVERSATIONS conversations in real time for SECONDS: frames lost in and out, the
           server's p99 frame time (from /metrics), memory once they are all in (after a minute)
           and at the end.

    python benchmarks/server_soak.py fuzz --messages 100000
    python benchmarks/server_soak.py long --frames 45000
    python benchmarks/server_soak.py many --conversations 64 --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import sphn

from serving_utils import free_port, health, rss_mb, start_server, stop_server, tiny_checkpoint, wait_ready

FRAME, RATE = 1920, 24000


def opus_pages(n: int, seed: int = 0) -> list[bytes]:
    writer = sphn.OpusStreamWriter(RATE)
    rng = np.random.default_rng(seed)
    pages = []
    while len(pages) < n:
        page = writer.append_pcm((0.2 * rng.standard_normal(FRAME)).astype(np.float32))
        if page:
            pages.append(page)
    return pages


def bad_message(rng: random.Random, pages: list[bytes]) -> bytes | str | list[bytes]:
    """One generated or mutated message (a list: a flood, sent back to back)."""
    page = rng.choice(pages)
    kind = rng.randrange(12)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))  # random bytes
    if kind == 1:
        return bytes([rng.randrange(7, 256)]) + page  # an unknown kind
    if kind == 2:
        return b"\x01" + page[:rng.randrange(1, len(page))]  # a truncated Ogg page
    if kind == 3:
        corrupt = bytearray(page)
        for _ in range(rng.randrange(1, 8)):
            corrupt[rng.randrange(len(corrupt))] = rng.getrandbits(8)
        return b"\x01" + bytes(corrupt)  # corrupt bytes (CRC, header or payload)
    if kind == 4:
        return b"\x01" + b"\x00" * rng.choice([(1 << 20) + 1, 4 << 20])  # huge
    if kind == 5:
        return rng.choice([b"", b"\x01"])  # empty
    if kind == 6:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 40)))  # a text frame
    if kind == 7:
        return bytes([rng.choice([0, 2, 4, 5])]) + page[:20]  # kinds the client must not send
    if kind == 8:
        return [b"\x01" + p for p in rng.sample(pages, min(len(pages), 50))]  # a flood of valid audio
    if kind == 9:
        return b"\x03" + bytes([rng.randrange(256)])  # a control code, often unknown
    if kind == 10:
        return b"\x01OggS" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(20, 200)))  # fake page
    return b"\x06"  # a ping among the rest


async def fuzzer(url: str, budget: list[int], seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    pages = opus_pages(64, seed)
    while budget[0] > 0:
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(url, max_msg_size=0)
            except aiohttp.ClientError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["connections"] += 1
            drain = asyncio.create_task(_drain(ws, stats))
            try:
                while budget[0] > 0 and not ws.closed:
                    msg = bad_message(rng, pages)
                    for m in (msg if isinstance(msg, list) else [msg]):
                        budget[0] -= 1
                        stats["sent"] += 1
                        await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
                    await asyncio.sleep(0)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass  # the server closed us (too many bad messages): reconnect
            finally:
                drain.cancel()
                await ws.close()


async def _drain(ws, stats: dict) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
            stats["error_messages"] += 1


async def normal_conversation(url: str, stop: asyncio.Event, result: dict) -> None:
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    rng = np.random.default_rng(1)
    samples, sent, gaps, last = 0, 0, [], None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            assert (await ws.receive(timeout=30)).data[:1] == b"\x00"

            async def receive():
                nonlocal samples, last
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                        samples += reader.append_bytes(msg.data[1:]).shape[-1]
                        now = time.monotonic()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
                        result.setdefault("errors", []).append(msg.data[1:].decode())

            receiver = asyncio.create_task(receive())
            start = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(max(0.0, start + sent * 0.08 - time.monotonic()))
                page = writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                if page:
                    await ws.send_bytes(b"\x01" + page)
                sent += 1
            await asyncio.sleep(2.0)
            receiver.cancel()
    result.update(frames_sent=sent, frames_received=samples // FRAME,
                  largest_gap_s=round(max(gaps), 3) if gaps else None)


async def fuzz(port: int, messages: int, connections: int) -> dict:
    url = f"ws://127.0.0.1:{port}/api/chat"
    stop, normal = asyncio.Event(), {}
    talker = asyncio.create_task(normal_conversation(url, stop, normal))
    await asyncio.sleep(2.0)
    stats = dict(sent=0, connections=0, connect_errors=0, error_messages=0)
    budget = [messages]
    start = time.monotonic()
    await asyncio.gather(*(fuzzer(url, budget, seed, stats) for seed in range(connections)))
    took = time.monotonic() - start
    await asyncio.sleep(2.0)  # the fuzzers' last connections are closing
    during = await health(port)
    stop.set()
    await talker
    await asyncio.sleep(2.0)
    after = await health(port)
    return {"mode": "fuzz", **stats, "seconds": round(took, 1), "messages_per_s": round(stats["sent"] / took),
            "active_after_fuzz": during["active"], "active_after_all": after["active"],
            "normal": normal}


async def long(port: int, pid: int, frames: int, window: int = 25) -> dict:
    url = f"ws://127.0.0.1:{port}/api/chat"
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    rng = np.random.default_rng(2)
    received, marks = [0], {}
    progress = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            assert (await ws.receive(timeout=30)).data[:1] == b"\x00"

            async def receive():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                        received[0] += reader.append_bytes(msg.data[1:]).shape[-1] // FRAME
                        progress.set()

            receiver = asyncio.create_task(receive())
            start = time.monotonic()
            sent = 0
            while sent < frames:
                while sent - received[0] > window:  # at most `window` frames in flight
                    progress.clear()
                    await asyncio.wait_for(progress.wait(), 60)
                page = writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                if page:
                    await ws.send_bytes(b"\x01" + page)
                sent += 1
                if sent in (750, frames // 2, frames):  # after 1 minute of audio, half way, the end
                    marks[sent] = round(rss_mb(pid), 1)
            deadline = time.monotonic() + 30
            while received[0] < sent - window and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            took = time.monotonic() - start
            receiver.cancel()
    first, last = marks[750], marks[frames]
    return {"mode": "long", "frames_sent": sent, "frames_received": received[0], "seconds": round(took, 1),
            "x_real_time": round(sent * 0.08 / took, 2), "rss_mb": marks,
            "rss_change_pct": round(100 * (last - first) / first, 2)}


async def many(port: int, pid: int, conversations: int, seconds: float) -> dict:
    url = f"ws://127.0.0.1:{port}/api/chat"
    stop, results = asyncio.Event(), [{} for _ in range(conversations)]
    idle_rss = rss_mb(pid)
    tasks = [asyncio.create_task(normal_conversation(url, stop, r)) for r in results]
    # Memory once every conversation has joined and warmed up (their states, codecs and buffers),
    # then at the end: the growth of a steady load.
    warm = min(60.0, seconds / 4)
    await asyncio.sleep(warm)
    warm_rss = rss_mb(pid)
    await asyncio.sleep(seconds - warm)
    end_rss = rss_mb(pid)
    stop.set()
    await asyncio.gather(*tasks)
    async with aiohttp.ClientSession() as s:
        metrics = await (await s.get(f"http://127.0.0.1:{port}/metrics")).text()
    lost = [max(0, r["frames_sent"] - r["frames_received"]) for r in results]
    dropped = [line for line in metrics.splitlines() if line.startswith(("openmoshi_frames_dropped_total",
                                                                         "openmoshi_silence_frames_total"))]
    return {"mode": "many", "conversations": conversations, "seconds": seconds,
            "frames_sent": sum(r["frames_sent"] for r in results),
            "frames_short_of_sent": sum(lost), "worst_conversation_short": max(lost),
            "largest_gap_s": max(r["largest_gap_s"] or 0 for r in results),
            "errors": sum(len(r.get("errors", [])) for r in results),
            "server_counters": dropped, "step_p99_ms": _p99_from_histogram(metrics),
            "rss_mb_idle": round(idle_rss, 1), f"rss_mb_after_{warm:g}s": round(warm_rss, 1),
            "rss_mb_end": round(end_rss, 1), "rss_change_pct": round(100 * (end_rss - warm_rss) / warm_rss, 2)}


def _p99_from_histogram(metrics: str) -> float | None:
    """The 99th percentile bucket bound of openmoshi_step_seconds, in ms."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("openmoshi_step_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for bound, count in sorted(buckets):
        if count >= 0.99 * total:
            return round(bound * 1000, 1)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["fuzz", "long", "many"])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--connections", type=int, default=3)
    p.add_argument("--frames", type=int, default=45_000)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_checkpoint(Path(tmp) / "model")
        port = free_port()
        flags = {"fuzz": ["--max-sessions", str(args.connections + 1), "--queue", "0"],
                 "long": ["--max-sessions", "1", "--clock", "input", "--idle-timeout", "600"],
                 "many": ["--max-sessions", str(args.conversations), "--queue", "0"]}[args.mode]
        proc = start_server(folder, port, *flags)
        try:
            asyncio.run(wait_ready(port, proc))
            if args.mode == "fuzz":
                row = asyncio.run(fuzz(port, args.messages, args.connections))
            elif args.mode == "long":
                row = asyncio.run(long(port, proc.pid, args.frames))
            else:
                row = asyncio.run(many(port, proc.pid, args.conversations, args.seconds))
            row["server_alive"] = proc.poll() is None
        finally:
            stop_server(proc)
    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
