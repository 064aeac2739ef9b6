"""Server step time per 80 ms frame against the number of concurrent conversations.

Runs the server's batched model loop (`Batcher`) directly, without sockets: N slots joined, every
tick feeds each slot one frame of audio and times the whole batched frame (Mimi encode, LM step,
Mimi decode, output hand-off). Reports p50/p99 per N and the largest N whose p99 stays under the
80 ms real-time budget. The model is small and random (tests/server_utils.py) unless --hf-repo.

    python benchmarks/server_load.py --sessions 1 2 4 8 16 --frames 60 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUDGET = 0.08


def measure(models, n: int, frames: int, warmup: int = 5) -> np.ndarray:
    from openmoshi.serving.batcher import Batcher
    from openmoshi.serving.metrics import Metrics

    lm, mimi, tokenizer = models
    batcher = Batcher(lm, mimi, tokenizer, n, metrics=Metrics())
    times: list[float] = []
    done = threading.Event()
    ready = threading.Semaphore(0)
    got = [0] * n
    slots = [batcher.open(batcher.sampling, ready.release, lambda pcm, text, i=i: got.__setitem__(i, got[i] + 1))
             for i in range(n)]
    original = batcher._tick

    def timed_tick(occupied, cfg):
        start = time.perf_counter()
        original(occupied, cfg)
        times.append(time.perf_counter() - start)
        if len(times) >= frames + warmup:
            done.set()
        for s in occupied:  # the next frame is "already there": measure compute, not the clock
            s.inbox.append(frame)

    frame = (0.1 * np.random.default_rng(0).standard_normal(mimi.frame_size)).astype(np.float32)
    batcher._tick = timed_tick
    batcher.start()
    for _ in range(n):
        ready.acquire()
    for s in slots:
        batcher.push(s, frame)
    done.wait()
    batcher.stop()
    return np.array(times[warmup:frames + warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from server_utils import tiny_models

    lm, mimi, tok = tiny_models()
    models = (lm.to(args.device), mimi.to(args.device), tok)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, frames {args.frames}")
    print("| sessions | p50 ms | p99 ms | max ms | real time (p99 < 80 ms) |")
    print("|---|---|---|---|---|")
    best = 0
    for n in args.sessions:
        t = measure(models, n, args.frames) * 1000
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        ok = p99 < BUDGET * 1000
        best = n if ok else best
        print(f"| {n} | {p50:.1f} | {p99:.1f} | {t.max():.1f} | {'yes' if ok else 'no'} |", flush=True)
    print(f"largest real-time number of conversations measured: {best}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
