"""Kyutai TTS speed: time to first audio and real-time factor, openmoshi's `lm.tts.generate` against
the official `TTSModel.generate`, same checkpoint files, same device, one process.

    python benchmarks/tts_speed.py --config small --streams 1,16 --device cpu
    python benchmarks/tts_speed.py --config tiny --streams 1 --repeats 1 --json out.json

Random weights in the released speaker-embedding layout (`tests/tts_utils.py`: "small" is dim 256,
6 layers, 8 codebooks, the released 1.28 s audio delay, cross-attention on a 5-speaker source; "tiny"
the parity tests' model), the small random Mimi of the tests, moshi-tts's sampling (temp 0.6), CFG
distilled (one row per stream). Both loops decode each frame with Mimi as it comes (streaming), so:

- time to first audio = wall time from the call until the first audio frame (the LM's frame
  `delay_steps`) is decoded to PCM;
- RTF = wall time of the whole batch / seconds of audio of one stream (< 1: faster than real time).

The runs alternate between the two implementations (`--repeats` each, best kept), so load from other
jobs hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from tts_utils import make_tts_checkpoint, make_voice, official_tts  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs back across the field "
        "to see whether the dog has noticed anything at all.")


def run_official(tts, voice: Path, streams: int, device) -> dict:
    entries = [tts.prepare_script([TEXT], padding_between=1) for _ in range(streams)]
    attrs = [tts.make_condition_attributes([voice], 2.0) for _ in range(streams)]
    first, count = [], [0]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), tts.mimi.streaming(streams):
        def on_frame(frame):
            if count[0] >= tts.delay_steps:
                tts.mimi.decode(frame[:, 1:])
                if not first:
                    sync()
                    first.append(time.perf_counter())
            count[0] += 1
        start = time.perf_counter()
        tts.generate(entries, attrs, on_frame=on_frame)
        sync()
        end = time.perf_counter()
    return {"ttfa": first[0] - start, "seconds": end - start, "frames": count[0] - tts.delay_steps}


def run_ours(model, voice: Path, streams: int, device) -> dict:
    from openmoshi.lm.tts import TTSSettings, condition_values, generate
    from openmoshi.lm.tts_script import script_to_entries
    from openmoshi.loading.tts_voices import load_speaker_embedding

    lm, mimi, spec = model.model.lm, model.model.mimi, model.spec
    entries = [script_to_entries(model.model.tokenizer, [TEXT], 12.5, True, 1) for _ in range(streams)]
    values = [condition_values(spec, [load_speaker_embedding(voice)], 2.0) for _ in range(streams)]
    state = mimi.init_decode_state(streams)
    first, count = [], [0]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def on_frame(frame):
        if count[0] >= spec.delay_steps:
            mimi.decode_step(frame[:, 1:, None].clamp(min=0), state)
            if not first:
                sync()
                first.append(time.perf_counter())
        count[0] += 1
    start = time.perf_counter()
    generate(lm, spec, TTSSettings(temp=0.6), entries, values, on_frame=on_frame)
    sync()
    end = time.perf_counter()
    return {"ttfa": first[0] - start, "seconds": end - start, "frames": count[0] - spec.delay_steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", choices=("tiny", "small"))
    p.add_argument("--streams", default="1,16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from openmoshi.inference.tts import load_tts
    from openmoshi.loading.resolve import resolve_files

    folder = Path(tempfile.mkdtemp(prefix="tts_speed_"))
    make_tts_checkpoint(folder, "small" if args.config == "small" else "emb", seed=0)
    voice = make_voice(folder / "voices", "voice", 1, frames=125)  # the released voices' length
    official = official_tts(folder, device=str(device), temp=0.6, cfg_coef=1.0)
    ours = load_tts(resolve_files(hf_repo=str(folder)), device=device, dtype=torch.float32)
    params = sum(p.numel() for p in ours.model.lm.parameters())
    print(f"config {args.config}: {params / 1e6:.1f} M LM parameters, delay {ours.spec.delay_steps} frames, "
          f"device {device}, threads {torch.get_num_threads()}")
    rows = []
    for streams in [int(x) for x in args.streams.split(",")]:
        torch.manual_seed(0)
        run_ours(ours, voice, 1, device), run_official(official, voice, 1, device)  # warm up
        best = {"openmoshi": None, "official": None}
        for _ in range(args.repeats):
            for name, fn, model in (("openmoshi", run_ours, ours), ("official", run_official, official)):
                torch.manual_seed(0)
                r = fn(model, voice, streams, device)
                if best[name] is None or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        row = {"streams": streams}
        for name, r in best.items():
            audio = r["frames"] / 12.5
            row[name] = {"ttfa_s": round(r["ttfa"], 3), "rtf": round(r["seconds"] / audio, 3),
                         "audio_s": round(audio, 2), "wall_s": round(r["seconds"], 2)}
        rows.append(row)
        o, m = row["official"], row["openmoshi"]
        print(f"{streams:3d} streams: openmoshi TTFA {m['ttfa_s']:.3f} s RTF {m['rtf']:.3f} | official TTFA "
              f"{o['ttfa_s']:.3f} s RTF {o['rtf']:.3f} ({m['audio_s']:.1f} s of audio per stream)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "params": params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
