"""Kyutai TTS served: time to first audio and real-time factor of `/api/tts_streaming` as clients see
them, N streams at once, against the official `TTSModel.generate` on the same checkpoint in the same
run (batch of N, every frame decoded as it comes; moshi-server runs that model in its TTS service).

    python benchmarks/tts_serving.py --config small --streams 1,16
    python benchmarks/tts_serving.py --config tiny --streams 1,4 --words-per-second 5

Each client connects (PcmMessagePack), sends the text one word per message (all at once, or at
`--words-per-second` as an LLM would), then Eos, and reads until the server closes:

- time to first audio = from the first word sent to the first Audio message received;
- RTF = from the first word sent to the close / seconds of audio received (< 1: faster than real time).

The server is a real `openmoshi serve` process (its model loop the process's one torch thread
pool, as deployed; a server started inside this process beside the official loop's thread pool
would be slowed by libgomp's throttling, see `openmoshi/engine/threads.py`). The official side has
no server in Python (moshi-server is Rust); its numbers are those of the model loop alone, in this
process (`benchmarks/tts_speed.py`'s `run_official`), so the comparison charges the network, the
protocol and streaming text to openmoshi only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgpack  # noqa: E402
import torch  # noqa: E402

from tts_speed import TEXT, run_official  # noqa: E402
from tts_utils import make_tts_checkpoint, make_voice, official_tts  # noqa: E402


async def client(url: str, words_per_second: float | None) -> dict:
    import websockets

    async with websockets.connect(url + "?format=PcmMessagePack&voice=voice", max_size=None) as ws:
        assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
        start = time.perf_counter()

        async def send():
            for i, word in enumerate(TEXT.split()):
                await ws.send(word if i == 0 else " " + word)
                if words_per_second:
                    await asyncio.sleep(1 / words_per_second)
            await ws.send(b"\0")

        sender = asyncio.create_task(send())
        first, samples = None, 0
        try:
            while True:
                m = msgpack.unpackb(await ws.recv())
                if m["type"] == "Audio":
                    first = first or time.perf_counter()
                    samples += len(m["pcm"])
        except websockets.ConnectionClosed:
            pass
        end = time.perf_counter()
        await sender
    return {"ttfa": first - start, "seconds": end - start, "audio": samples / 24000}


def serve_and_run(folder: Path, streams: int, words_per_second: float | None, device: str,
                  threads: int | None) -> list[dict]:
    from serving_utils import free_port, start_server, stop_server, wait_ready

    port = free_port()
    proc = start_server(folder, port, "--tts-voice", "voice", "--tts-voice-repo", str(folder / "voices"),
                        "--max-sessions", str(streams), "--device", device, threads=threads)

    async def run() -> list[dict]:
        await wait_ready(port, proc)
        url = f"ws://127.0.0.1:{port}/api/tts_streaming"
        await client(url, None)  # warm up
        return await asyncio.gather(*(client(url, words_per_second) for _ in range(streams)))

    try:
        return asyncio.run(run())
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", choices=("tiny", "small"))
    p.add_argument("--streams", default="1,16")
    p.add_argument("--words-per-second", type=float, default=None, help="pace of the text (default: all at once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads of both sides (0: torch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="tts_serving_"))
    make_tts_checkpoint(folder, "small" if args.config == "small" else "emb", seed=0)
    voice = make_voice(folder / "voices", "voice", 1, frames=125)  # the released voices' length
    official = official_tts(folder, device=str(device), temp=0.6, cfg_coef=1.0)
    print(f"config {args.config}, device {device}, threads {torch.get_num_threads()}, text of "
          f"{len(TEXT.split())} words" + (f" at {args.words_per_second:g} words/s" if args.words_per_second else ""))
    rows = []
    for streams in [int(x) for x in args.streams.split(",")]:
        run_official(official, voice, 1, device)  # warm up
        o = run_official(official, voice, streams, device)
        results = serve_and_run(folder, streams, args.words_per_second, args.device, args.threads or None)
        ttfa = [r["ttfa"] for r in results]
        rtf = [r["seconds"] / r["audio"] for r in results]
        row = {"streams": streams,
               "openmoshi_server": {"ttfa_median_s": round(statistics.median(ttfa), 3), "ttfa_max_s": round(max(ttfa), 3),
                                    "rtf_median": round(statistics.median(rtf), 3), "rtf_max": round(max(rtf), 3)},
               "official_model_loop": {"ttfa_s": round(o["ttfa"], 3), "rtf": round(o["seconds"] / (o["frames"] / 12.5), 3)}}
        rows.append(row)
        s, off = row["openmoshi_server"], row["official_model_loop"]
        print(f"{streams:3d} streams: openmoshi server TTFA median {s['ttfa_median_s']:.3f} s (max {s['ttfa_max_s']:.3f})"
              f", RTF median {s['rtf_median']:.3f} (max {s['rtf_max']:.3f}) | official model loop TTFA "
              f"{off['ttfa_s']:.3f} s, RTF {off['rtf']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
