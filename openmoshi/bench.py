"""`openmoshi bench`: the streaming loop on random weights, timed per 80 ms frame.

Per frame: Mimi streaming encode of 1920 samples, one LM step (temporal + depth transformer with
sampling), Mimi streaming decode of the frame's codes; median and p99 of each and of the whole
frame, peak GPU memory. Nothing is downloaded: weights are random, shapes are those of the config.
On CUDA the LM step and the Mimi steps run as CUDA graphs (`cuda_graph.graphed`, `GraphedStep`, as
the server and offline inference run them) unless --no-cuda-graph or OPENMOSHI_NO_CUDA_GRAPH=1.

May import: openmoshi.modules, openmoshi.mimi, openmoshi.lm, openmoshi.accel, openmoshi.loading.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from openmoshi.accel.cuda_graph import GraphedStep, graphed
from openmoshi.accel.mimi_cpu import WEIGHT_MODES
from openmoshi.lm import generate as G
from openmoshi.lm.config import LMConfig
from openmoshi.lm.sampling import SamplingConfig
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


def parse_mimi_fast(text: str | None, device: torch.device) -> tuple[str, str] | None:
    """`--mimi-fast` value -> (encode, decode) weight modes of `mimi_cpu.fast_cpu`, or None for
    the float32 reference. Default: "fp32,fp32" on CPU (the reference's weights in a faster
    layout), None elsewhere (CUDA runs the Mimi steps as CUDA graphs instead)."""
    if text is None:
        return ("fp32", "fp32") if device.type == "cpu" else None
    if text == "off":
        return None
    modes = tuple(text.split(","))
    if len(modes) != 2 or any(m not in WEIGHT_MODES for m in modes):
        raise ValueError(f"--mimi-fast must be 'off' or ENCODE,DECODE with modes in {WEIGHT_MODES}, got {text!r}")
    return modes


def random_lm(cfg: LMConfig, device, dtype, quantize: str | None = None):
    torch.manual_seed(0)
    return load_lm(None, cfg, device=device, dtype=dtype, quantize=quantize)


@torch.no_grad()
def bench_loop(lm, mimi, batch_size: int, steps: int, warmup: int, device: torch.device,
               cuda_graph: bool = True, codec_only: bool = False) -> BenchResult:
    K = mimi.num_codebooks if mimi is not None else lm.cfg.num_user_codebooks
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    enc_state = mimi.init_encode_state(batch_size) if mimi is not None else None
    dec_state = mimi.init_decode_state(batch_size) if mimi is not None else None
    graphs = None if cuda_graph else False  # None: on CUDA, unless OPENMOSHI_NO_CUDA_GRAPH=1
    encode = graphed(lambda pcm: mimi.encode_step(pcm, enc_state), graphs, device, name="mimi_encode")
    decode = graphed(lambda codes: mimi.decode_step(codes, dec_state), graphs, device, name="mimi_decode")
    if not codec_only:
        lm_step = GraphedStep(lm, G.init_state(lm, batch_size, SamplingConfig()), graphs)
    times: dict[str, list[float]] = {"enc": [], "lm": [], "dec": [], "frame": []}
    codes = torch.zeros(batch_size, K, dtype=torch.long, device=device)
    audio = torch.zeros(batch_size, K, 1, dtype=torch.long, device=device)
    for i in range(warmup + steps):
        pcm = torch.randn(batch_size, 1, 1920, device=device) * 0.05
        _sync(device)
        t0 = time.perf_counter()
        if mimi is not None:
            codes = encode(pcm)[:, :, 0]
        _sync(device)
        t1 = time.perf_counter()
        if not codec_only:
            audio = lm_step(codes).audio.clamp(min=0)[:, :, None]
        else:
            audio = codes[:, :, None]
        _sync(device)
        t2 = time.perf_counter()
        if mimi is not None:
            decode(audio)
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
