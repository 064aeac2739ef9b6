"""Injected speech (issue 22): time from `conversation.item.create` (an assistant text) to the first
audio delta of the response that says it, on `/v1/realtime` of a real `openmoshi serve`.

    python benchmarks/inject_latency.py                      # CPU, the tests' tiny random checkpoint
    python benchmarks/inject_latency.py --trials 10 --json out.json
    python benchmarks/inject_latency.py --hf-repo DIR --flags "--device cuda"

The client streams silence in real time (as a voice agent's microphone would), waits for Moshi to be
quiet or not (it does not matter: the text's first frame starts its own response), sends the item and
takes the arrival of `response.created` and of that response's first `response.output_audio.delta`
minus the send time. Expected: the command waits for the next tick (up to one 80 ms frame, as the
input clock paces it), and the frame of the forced token comes out `max_delay` ticks later (one
frame for Moshi's acoustic delay), plus the step's own compute time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from serving_utils import free_port, start_server, stop_server, tiny_checkpoint, wait_ready

TEXT = "hello world moshi speaks"
FRAME, RATE = 1920, 24000


async def measure(port: int, trials: int, text: str) -> list[dict]:
    silence = base64.b64encode(np.zeros(FRAME, "<i2").tobytes()).decode()
    events: list[tuple[float, dict]] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{port}/v1/realtime?model=moshi") as ws:
        async def read():
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    events.append((time.monotonic(), json.loads(msg.data)))

        async def stream():
            start = time.monotonic()
            i = 0
            while True:
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
                i += 1
                await asyncio.sleep(max(0.0, start + i * FRAME / RATE - time.monotonic()))

        reader, streamer = asyncio.create_task(read()), asyncio.create_task(stream())
        await ws.send_str(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
        await asyncio.sleep(1.0)
        rows = []
        for _ in range(trials):
            at, sent = len(events), time.monotonic()
            await ws.send_str(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}}))
            created = audio = None
            deadline = sent + 30
            while audio is None and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                for t, e in events[at:]:
                    if created is None and e["type"] == "response.created":
                        created = (t, e["response"]["id"])
                    elif created and e["type"] == "response.output_audio.delta" and e["response_id"] == created[1]:
                        audio = t
                        break
            if audio is None:
                raise RuntimeError("no audio of the injected text within 30 s")
            rows.append({"created_ms": 1000 * (created[0] - sent), "first_audio_ms": 1000 * (audio - sent)})
            # Let it be said (a random model may talk on and never end its response: the next text's
            # first frame ends it).
            await asyncio.sleep(0.08 * 4 * len(text.split()) + 1.0)
        streamer.cancel()
        reader.cancel()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-repo", help="a model folder (default: the tests' tiny random checkpoint)")
    p.add_argument("--flags", default="", help="extra `openmoshi serve` flags, e.g. '--device cuda'")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--text", default=TEXT)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (0: torch's choice)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.hf_repo) if args.hf_repo else tiny_checkpoint(Path(tmp) / "model")
        port = free_port()
        proc = start_server(folder, port, "--clock", "realtime", *shlex.split(args.flags), threads=args.threads or None)
        try:
            asyncio.run(wait_ready(port, proc))
            rows = asyncio.run(measure(port, args.trials, args.text))
        finally:
            stop_server(proc)
    summary = {k: {"p50": statistics.median(r[k] for r in rows), "max": max(r[k] for r in rows)}
               for k in ("created_ms", "first_audio_ms")}
    for k, v in summary.items():
        print(f"{k:>15}: p50 {v['p50']:.1f} ms, max {v['max']:.1f} ms over {len(rows)} trials")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "text": args.text,
                                               "flags": args.flags}, indent=1))


if __name__ == "__main__":
    main()
