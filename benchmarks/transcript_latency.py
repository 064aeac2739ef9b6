"""User transcripts (issue 22): time from the end of the user's speech to the completed transcript on
`/v1/realtime` of a real `openmoshi serve --stt-model`, and how much of it is the STT model's own delay.

    python benchmarks/transcript_latency.py                  # CPU, the tests' tiny random Moshi and STT
    python benchmarks/transcript_latency.py --trials 10 --json out.json
    python benchmarks/transcript_latency.py --hf-repo MOSHI_DIR --stt-model STT_DIR --flags "--device cuda"

The client streams `--seconds` of espeak-ng speech in real time with transcription on and turn
detection off, then silence; at the end of the speech it commits the buffer (as a push-to-talk
client, or a VAD that has just decided) and takes the arrival of the item's
`conversation.item.input_audio_transcription.completed` minus the commit's send time. Most of it is
the STT's delay (`stt_config.audio_delay_seconds`: 0.5 s for kyutai/stt-1b-en_fr, the tests' tiny
model's is printed): a transcript can complete only once the STT has read that much audio past the
end, which a client streaming in real time sends over about that long (its frames go out a little
ahead of their time); the rest is the server (steps, the wait for a word still open). There is no official Realtime
server to compare with: the official package serves `/api/chat` only.
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

from serving_utils import ROOT, free_port, start_server, stop_server, tiny_checkpoint, wait_ready

FRAME, RATE = 1920, 24000


def speech(seconds: float) -> np.ndarray:
    from official_utils import speech as make

    return make(seconds).numpy()


async def measure(port: int, trials: int, seconds: float) -> list[dict]:
    pcm = (np.clip(speech(seconds), -1, 1) * 32767).astype("<i2")
    silence = np.zeros(FRAME, "<i2")
    events: list[tuple[float, dict]] = []
    rows = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{port}/v1/realtime?model=moshi") as ws:
        async def read():
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    events.append((time.monotonic(), json.loads(msg.data)))

        async def send_frames(frames, start):
            for i, frame in enumerate(frames):
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(frame.tobytes()).decode()}))
                await asyncio.sleep(max(0.0, start + (i + 1) * FRAME / RATE - time.monotonic()))

        reader = asyncio.create_task(read())
        await ws.send_str(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": None, "transcription": {"model": "kyutai-stt"}}}}}))
        await asyncio.sleep(0.5)
        frames = [pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]
        for _ in range(trials):
            await send_frames(frames, time.monotonic())
            at, sent = len(events), time.monotonic()
            await ws.send_str(json.dumps({"type": "input_audio_buffer.commit"}))
            tail = asyncio.create_task(send_frames([silence] * 200, time.monotonic()))  # the microphone goes on
            item = done = None
            while done is None and time.monotonic() < sent + 60:
                await asyncio.sleep(0.005)
                for t, e in events[at:]:
                    if e["type"] == "input_audio_buffer.committed":
                        item = e["item_id"]
                    elif item and e["type"].startswith("conversation.item.input_audio_transcription.") \
                            and e.get("item_id") == item and e["type"].endswith(("completed", "failed")):
                        done = (t, e)
            tail.cancel()
            if done is None:
                raise RuntimeError("no completed transcript within 60 s")
            t, e = done
            rows.append({"completed_ms": 1000 * (t - sent), "status": e["type"].rsplit(".", 1)[1],
                         "words": len(e.get("transcript", "").split())})
        reader.cancel()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-repo", help="the Moshi model folder (default: the tests' tiny random checkpoint)")
    p.add_argument("--stt-model", help="the STT model folder (default: the tests' tiny random Kyutai STT)")
    p.add_argument("--flags", default="", help="extra `openmoshi serve` flags, e.g. '--device cuda'")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds of speech per turn")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (0: torch's choice)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from stt_utils import make_stt

        from openmoshi.loading.resolve import resolve_files

        folder = Path(args.hf_repo) if args.hf_repo else tiny_checkpoint(Path(tmp) / "model")
        stt = Path(args.stt_model) if args.stt_model else make_stt(Path(tmp) / "stt", seed=5)
        delay = resolve_files(hf_repo=str(stt)).config.stt_config.get("audio_delay_seconds")
        port = free_port()
        proc = start_server(folder, port, "--stt-model", str(stt), "--clock", "realtime", *shlex.split(args.flags),
                            threads=args.threads or None)
        try:
            asyncio.run(wait_ready(port, proc))
            rows = asyncio.run(measure(port, args.trials, args.seconds))
        finally:
            stop_server(proc)
    ms = [r["completed_ms"] for r in rows]
    summary = {"completed_ms": {"p50": statistics.median(ms), "max": max(ms)}, "stt_delay_ms": 1000 * (delay or 0),
               "statuses": sorted({r["status"] for r in rows})}
    print(f"STT delay {summary['stt_delay_ms']:.0f} ms; end of speech -> completed transcript: p50 "
          f"{summary['completed_ms']['p50']:.1f} ms, max {summary['completed_ms']['max']:.1f} ms over {len(rows)} "
          f"trials ({', '.join(summary['statuses'])}; words per turn {[r['words'] for r in rows]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "flags": args.flags,
                                               "root": str(ROOT)}, indent=1))


if __name__ == "__main__":
    main()
