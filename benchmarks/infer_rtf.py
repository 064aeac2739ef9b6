"""Real-time factor of offline inference on CPU: `openmoshi infer` (its Python loop) vs the official
`moshi.run_inference.InferenceState` loop, on the same checkpoint files and the same speech.

    python benchmarks/infer_rtf.py [--seconds 4] [--configs tiny small]

RTF = wall-clock seconds of the loop / seconds of input audio (< 1: faster than real time). Model
loading is excluded for both; both include Mimi encoding and decoding (full-size random Mimi, fp32),
which dominates on CPU for these small LMs. Greedy decoding, batch 1, float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from infer_utils import MOSHI, SMALL, make_checkpoint, official_loop  # noqa: E402
from official_utils import speech  # noqa: E402

CONFIGS = {"tiny": MOSHI, "small": SMALL}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from openmoshi.inference.offline import load

    pcm = speech(args.seconds)[None]
    audio_s = int(args.seconds * 24000) // 1920 * 0.08
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seconds} s of speech")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            folder = Path(tmp) / name
            make_checkpoint(folder, "moshi", lm_kwargs=CONFIGS[name])
            ours, official = [], []
            model = load(str(folder), device="cpu", dtype="float32")
            params = sum(p.numel() for p in model.model.lm.parameters())
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.run(pcm, greedy=True)
                ours.append(time.perf_counter() - t)
                official_loop(folder, pcm, use_sampling=False, timer=official)
            print(f"{name:6s} LM {params / 1e6:5.1f} M params: openmoshi RTF {min(ours) / audio_s:.2f}, "
                  f"official RTF {min(official) / audio_s:.2f}")


if __name__ == "__main__":
    main()
