"""Kyutai STT streams per model step, at real time: the server's STT tick vs the official LMGen loop.

    python benchmarks/stt_streams.py [--batch-sizes 1 2 4 8 16] [--steps 30] [--config small]
    python benchmarks/stt_streams.py --device cuda --config stt_1b --batch-sizes 1 64 256 400   (a GPU)

For each batch size B, both sides run B streams of speech, one 80 ms frame per step, every stream
active (what a loaded server does): ours is the server's model-loop tick (`serving.loop.tick`: Mimi
encode, LM step with the pause heads, outputs to the host), the official side `mimi.encode` then
`LMGen.step_with_extra_heads` (eager on a CPU; on CUDA both sides run their CUDA graphs). Same
checkpoint files (a random STT in the released layout, with a small Mimi), float32 unless
`--dtype`, greedy; model loading and the first `--warmup` steps
are not timed; the two loops alternate step by step, and each side's median step is reported (the
machine may be shared). A step that takes under 80 ms keeps B streams at real time: the table says the
largest such B of each side ("streams at real time"), and whether both gave the same text tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
if "cuda" not in sys.argv:  # on a CPU both sides run eagerly; on CUDA both capture their graphs
    os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from infer_utils import STT  # noqa: E402
from official_utils import speech  # noqa: E402
from stt_utils import HEADS, make_stt, official_models  # noqa: E402

FRAME = 1920
REAL_TIME_MS = 80.0
CONFIGS = {
    "tiny": dict(STT, **HEADS),
    # a 1b-like shape at small width: 32 streams... of which Mimi gives 16 here (SMALL_MIMI)
    "small": dict(STT, **HEADS, dim=512, num_heads=8, num_layers=8, n_q=16, delays=[0] * 17, context=375),
    # kyutai/stt-1b-en_fr's transformer (2048 wide, 16 layers, context 750), 16 of its 32 codebooks
    "stt_1b": dict(STT, **HEADS, dim=2048, num_heads=16, num_layers=16, hidden_scale=4.0, n_q=16,
                   delays=[0] * 17, context=750, max_period=100000),
}


def frames_of(batch: int, steps: int) -> torch.Tensor:
    """[B, steps, FRAME]: a different stretch of speech per stream."""
    x = speech((steps + batch) * 0.08)
    return torch.stack([x[b * FRAME:(b + steps) * FRAME].view(steps, FRAME) for b in range(batch)])


def our_steps(model, pcm: torch.Tensor, device: str = "cpu"):
    """Yields (ms, text tokens) of each of the server's ticks over `pcm` [B, T, FRAME]."""
    from openmoshi.engine.engine import Engine
    from openmoshi.engine.speed import SpeedConfig, choose
    from openmoshi.lm.sampling import SamplingConfig
    from openmoshi.serving.loop import TickInput, tick

    B, T, _ = pcm.shape
    engine = Engine.build(model, B, choose(torch.device(device), SpeedConfig(self_check=False)),
                          SamplingConfig.greedy(), all_buckets=False)
    active = np.ones(B, bool)
    for s in range(T):
        inp = TickInput(pcm[:, None, s].numpy(), active, np.full(B, s == 0), s)
        start = time.perf_counter()
        out = tick(engine, inp, None)  # its outputs are on the host: the device is done
        yield 1000 * (time.perf_counter() - start), out.text


@torch.no_grad()
def official_steps(folder: Path, pcm: torch.Tensor, device: str = "cpu", dtype=torch.float32):
    """Yields (ms, text tokens) of each official step (Mimi encode, LMGen.step_with_extra_heads)."""
    from moshi.models import LMGen

    _, mimi, lm = official_models(folder, device, dtype)
    pcm = pcm.to(device)
    gen = LMGen(lm, temp=0.0, temp_text=0.0, use_sampling=False)
    B, T, _ = pcm.shape
    with mimi.streaming(B), gen.streaming(B):
        for s in range(T):
            with torch.no_grad():
                start = time.perf_counter()
                codes = mimi.encode(pcm[:, None, s])
                if s == 0:  # as the server's first frame: the encoder restarts after it
                    mimi.reset_streaming()
                out, heads = gen.step_with_extra_heads(codes)
                text = out[:, 0, 0].tolist()
                _ = [h[:, 0, 0].tolist() for h in heads]
                ms = 1000 * (time.perf_counter() - start)
            yield ms, text


def compare(model, folder: Path, pcm: torch.Tensor, warmup: int, device: str = "cpu",
            dtype=torch.float32) -> tuple[float, float, bool]:
    """Both loops step by step in turn (a busy machine slows both alike): median ms per step of
    each, and whether they gave the same tokens."""
    times, same = ([], []), True
    steps = zip(our_steps(model, pcm, device), official_steps(folder, pcm, device, dtype))
    for s, ((a, ta), (b, tb)) in enumerate(steps):
        same &= ta == tb
        if s >= warmup:
            times[0].append(a)
            times[1].append(b)
    return float(np.median(times[0])), float(np.median(times[1])), same


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    from openmoshi.loading.model import load_model
    from openmoshi.loading.resolve import resolve_files

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_stt(Path(tmp) / "stt", lm_kwargs=CONFIGS[args.config])
        dtype = getattr(torch, args.dtype)
        model = load_model(resolve_files(str(folder)), args.device, dtype)
        params = sum(p.numel() for p in model.lm.parameters())
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or \
            platform.machine()
        print(f"{where}, {args.dtype}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; STT '{args.config}': LM {params / 1e6:.1f} M params, "
              f"{model.lm.cfg.n_q} codebooks, small Mimi; {args.steps} steps ({args.warmup} not timed)")
        print(f"{'streams':>8} {'openmoshi ms/step':>18} {'official ms/step':>17} {'speed-up':>9} {'tokens':>7}")
        best, rows = {"openmoshi": 0, "official": 0}, []
        for B in args.batch_sizes:
            pcm = frames_of(B, args.steps)
            t_ours, t_off, equal = compare(model, folder, pcm, args.warmup, args.device, dtype)
            rows.append({"streams": B, "openmoshi_ms": t_ours, "official_ms": t_off, "tokens_equal": equal})
            same = "equal" if equal else "differ"
            print(f"{B:8d} {t_ours:18.1f} {t_off:17.1f} {t_off / t_ours:8.2f}x {same:>7}")
            for name, t in (("openmoshi", t_ours), ("official", t_off)):
                if t <= REAL_TIME_MS:
                    best[name] = max(best[name], B)
        print(f"streams at real time (step <= {REAL_TIME_MS:.0f} ms, largest batch tried): "
              f"openmoshi {best['openmoshi']}, official {best['official']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"config": args.config, "rows": rows, "real_time": best}, indent=1))


if __name__ == "__main__":
    main()
