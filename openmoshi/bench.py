"""`openmoshi bench`: the streaming loop on random weights, timed per 80 ms frame.

Per frame: Mimi streaming encode of 1920 samples, one LM step (temporal + depth transformer with
sampling), Mimi streaming decode of the frame's codes; median and p99 of each and of the whole
frame, peak GPU memory. Nothing is downloaded: weights are random, shapes are those of the config.
The frame runs through an `engine.Engine`, as the server and offline inference run it (with the
speed paths `engine.speed` chose: CUDA graphs, fused kernels, the CPU Mimi fast path).

May import: openmoshi.modules, openmoshi.mimi, openmoshi.lm, openmoshi.accel, openmoshi.loading, openmoshi.engine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from openmoshi.lm.config import LMConfig
from openmoshi.loading.lm import load_lm


@dataclass(frozen=True)
class BenchResult:
    batch_size: int
    steps: int
    mimi_encode_ms: float
    lm_step_ms: float
    mimi_decode_ms: float
    frame_ms: float
    frame_p99_ms: float
    lm_step_p99_ms: float
    peak_memory_gb: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def random_lm(cfg: LMConfig, device, dtype, quantize: str | None = None):
    torch.manual_seed(0)
    return load_lm(None, cfg, device=device, dtype=dtype, quantize=quantize)


@torch.no_grad()
def bench_loop(engine, steps: int, warmup: int, codec_only: bool = False) -> BenchResult:
    """Times `steps` frames (after `warmup`) of the engine's whole batch."""
    lm, mimi, device, batch_size = engine.lm, engine.mimi, engine.device, engine.batch
    K = mimi.num_codebooks if mimi is not None else lm.cfg.num_user_codebooks
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"enc": [], "lm": [], "dec": [], "frame": []}
    codes = torch.zeros(batch_size, K, dtype=torch.long, device=device)
    for i in range(warmup + steps):
        pcm = torch.randn(batch_size, 1, 1920, device=device) * 0.05
        _sync(device)
        t0 = time.perf_counter()
        if mimi is not None:
            codes = engine.encode(pcm)[:, :, 0]
        _sync(device)
        t1 = time.perf_counter()
        if not codec_only:
            audio = engine.step(codes).audio.clamp(min=0)[:, :, None]
        else:
            audio = codes[:, :, None]
        _sync(device)
        t2 = time.perf_counter()
        if mimi is not None:
            engine.decode(audio)
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            times["enc"].append(t1 - t0)
            times["lm"].append(t2 - t1)
            times["dec"].append(t3 - t2)
            times["frame"].append(t3 - t0)
    ms = lambda xs: 1000 * statistics.median(xs)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return BenchResult(batch_size, steps, ms(times["enc"]), ms(times["lm"]), ms(times["dec"]), ms(times["frame"]),
                       1000 * _p99(times["frame"]), 1000 * _p99(times["lm"]), peak)


def format_row(r: BenchResult) -> str:
    mem = f"{r.peak_memory_gb:6.2f}" if r.peak_memory_gb is not None else "     -"
    return (f"{r.batch_size:5d} {r.mimi_encode_ms:9.2f} {r.lm_step_ms:9.2f} {r.mimi_decode_ms:9.2f} "
            f"{r.frame_ms:9.2f} {r.frame_p99_ms:9.2f} {mem}")


HEADER = "batch  encode_ms  lm_ms     decode_ms frame_ms  p99_ms    peakGB"


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
