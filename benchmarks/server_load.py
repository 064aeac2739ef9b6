"""Server frame time against occupied slots, on servers of several sizes (issue 12).

Drives the server's batched model loop (`Batcher`) by hand, without sockets or clock: a server
sized S (--max-sessions) with k conversations, every tick one frame of audio per conversation,
timing the whole batched frame (Mimi encode, LM step, Mimi decode, hand-off). Prints p50/p99 per
(S, k) and the ratio to a server sized k with its k conversations: with occupancy (ticks on the
occupied slots' bucket), a frame with k occupied slots should cost about what a server sized k
spends. `--all-slots` computes every slot as before issue 12, in the same run, for comparison.

    python benchmarks/server_load.py --sizes 1 4 8 64 --frames 40 --threads 2
    python benchmarks/server_load.py --sizes 1 4 --mimi full --frames 20      # real-size Mimi
    python benchmarks/server_load.py --config moshi_7b --device cuda --sizes 1 8 64 --occupied 1 8 64 --mimi full

Models: the tiny random LM of tests/server_utils.py and its tiny Mimi (this measures the batching,
not the 7B), or random weights of a built-in config (--config moshi_7b, --dtype, --quantize) and the
real-size random Mimi (--mimi full, with its CPU fast path on a CPU). Steps run eagerly (CUDA graphs
would be captured per bucket and window: minutes for the 7B).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUDGET = 0.08


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(models, size: int, k: int, frames: int, warmup: int, all_slots: bool) -> np.ndarray:
    """Seconds per tick of the server's model loop (`serving.loop`) with k of `size` seats taken."""
    from openmoshi.lm.sampling import SamplingConfig
    from openmoshi.serving.loop import Join
    from openmoshi.serving.server import MoshiServer, ServerConfig

    lm, mimi, tok = models
    server = MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=size, static_dir=None, cuda_graph=False),
                         SamplingConfig())
    loop = server.loop
    loop.sink = lambda events: None
    loop.engine = loop.make_engine()
    if all_slots:  # as before occupancy: every tick computes all the server's slots
        loop.engine.buckets = {size: loop.engine.buckets[size]}
        loop.engine.fit = lambda used: size
    seats = [server.seats.open(None) for _ in range(k)]
    for seat in seats:
        loop.submit(Join(seat, server.sampling))
    loop._apply_commands()
    frame = (0.1 * np.random.default_rng(0).standard_normal(mimi.frame_size)).astype(np.float32)
    times = []
    for i in range(warmup + frames):
        for seat in seats:
            loop.push(seat, frame[None])
        sync(loop.engine.device)
        start = time.perf_counter()
        loop._tick()  # ends with the outputs on the host: synchronised
        loop._events.clear()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 64], help="servers' --max-sessions")
    parser.add_argument("--occupied", type=int, nargs="+", default=None,
                        help="conversations to measure on each server (default 1, 2, 4, ... up to its size)")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mimi", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--all-slots", action="store_true", help="also time every slot computed (before issue 12)")
    parser.add_argument("--config", default=None, help="a built-in LM config (moshi_7b, small, tiny) with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from server_utils import tiny_models

    device = torch.device(args.device)
    lm, mimi, tok = tiny_models()
    if args.config:
        from openmoshi.lm.config import BUILTIN_CONFIGS
        from openmoshi.loading.lm import load_lm

        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        torch.manual_seed(0)
        lm = load_lm(None, BUILTIN_CONFIGS[args.config], device, dtype, quantize=args.quantize)
    if args.mimi == "full" or args.config:  # the built-in configs read the real Mimi's 2048-entry codebooks
        from openmoshi.accel.mimi_cpu import fast_cpu
        from openmoshi.loading.mimi import load_mimi

        torch.manual_seed(0)
        mimi = load_mimi(None, num_codebooks=8, device=device)
        mimi = fast_cpu(mimi) if device.type == "cpu" else mimi
    models = (lm.to(device), mimi.to(device), tok)
    print(f"{device}, torch threads {torch.get_num_threads()}, {args.frames} frames, LM {args.config or 'tiny'}"
          f"{' ' + args.quantize if args.quantize else ''}, mimi {args.mimi}")
    print("| server size | occupied | p50 ms | p99 ms | p50 / server sized k | all slots p50 ms |")
    print("|---|---|---|---|---|---|")
    rows, alone = [], {}
    for size in sorted(args.sizes):  # ascending: a server sized k is measured before larger ones
        ks = args.occupied or sorted({min(2 ** i, size) for i in range(size.bit_length() + 1)})
        for k in [k for k in ks if k <= size]:
            t = measure(models, size, k, args.frames, args.warmup, False) * 1000
            p50, p99 = float(np.percentile(t, 50)), float(np.percentile(t, 99))
            if size == k:
                alone[k] = p50
            elif k not in alone:  # the reference: a server sized k with its k conversations
                alone[k] = float(np.percentile(measure(models, k, k, args.frames, args.warmup, False) * 1000, 50))
            before = None
            if args.all_slots:
                before = float(np.percentile(measure(models, size, k, args.frames, args.warmup, True) * 1000, 50))
            ratio = p50 / alone[k]
            rows.append({"size": size, "occupied": k, "p50_ms": p50, "p99_ms": p99, "vs_sized_k": ratio,
                         "all_slots_p50_ms": before})
            print(f"| {size} | {k} | {p50:.1f} | {p99:.1f} | {ratio:.2f} | "
                  f"{'' if before is None else f'{before:.1f}'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"mimi": args.mimi, "rows": rows}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
