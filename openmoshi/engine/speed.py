"""The speed paths of a streaming model, in one place: which apply on a device, what each swaps, what
the start-up self-check said. The eager modules stay the definition; nothing else decides.

    lm, mimi, speed = prepare(lm, mimi, device, SpeedConfig(cuda_graphs=False))
    speed.cuda_graphs, speed.fused, speed.mimi_fast   # what runs; an Engine wraps its steps accordingly
    speed.describe()                                   # one line for logs and `bench`

The registry (`PATHS`):

    path         device  what is swapped                                           off with
    fused        cuda    the LM's and Mimi's norms, attention (RoPE + KV-cache        --no-fused,
                         writes), gating and residual + norm: module classes in place  OPENMOSHI_NO_FUSED_KERNELS=1
    mimi_cpu     cpu     Mimi's large matmuls, in a copy (`accel.mimi_cpu`)           --mimi-fast off
    cuda_graphs  cuda    Mimi encode, LM step, Mimi decode captured at the call site  --no-cuda-graph,
                         (`accel.cuda_graph`, one graph per bucket and window)         OPENMOSHI_NO_CUDA_GRAPH=1

On CUDA, what is switched on is then checked against the reference (`accel.self_check`): whatever
fails is switched off with one warning, and `Speed` says so. The environment switches are read here
and nowhere else on the serving and inference paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmoshi.accel import cuda_graph, fused
from openmoshi.accel.env import env_disabled
from openmoshi.accel.mimi_cpu import WEIGHT_MODES, fast_cpu
from openmoshi.accel.self_check import CheckResult, check_fast_paths, report


@dataclass(frozen=True)
class SpeedPath:
    name: str
    device: str
    swaps: str
    off: str


PATHS = (
    SpeedPath("fused", "cuda", "norms, attention (RoPE + KV writes), gating, residual + norm module classes",
              f"--no-fused, {fused.ENV_OFF}=1"),
    SpeedPath("mimi_cpu", "cpu", "Mimi's large matmuls (a copy)", "--mimi-fast off"),
    SpeedPath("cuda_graphs", "cuda", "encode / LM step / decode captured per bucket and window",
              f"--no-cuda-graph, {cuda_graph.ENV_OFF}=1"),
)
DEFAULT_MIMI_FAST = ("fp32", "fp32")  # the CPU default: the reference's weights in a GEMV-friendly layout


@dataclass(frozen=True)
class SpeedConfig:
    """What a command asks for; None: the device's default (every path that applies, unless the
    environment turns it off)."""

    cuda_graphs: bool | None = None
    fused: bool | None = None
    mimi_fast: str | None = None  # "ENC,DEC" weight modes of `mimi_cpu.fast_cpu`, or "off"
    self_check: bool = True


@dataclass(frozen=True)
class Speed:
    """What runs on `device`, decided once (see the module doc)."""

    device: torch.device
    cuda_graphs: bool = False
    fused: bool = False
    mimi_fast: tuple[str, str] | None = None
    check: CheckResult | None = None

    def describe(self) -> str:
        mimi = "fast " + ",".join(self.mimi_fast) if self.mimi_fast else "float32 reference"
        return (f"cuda graphs {'on' if self.cuda_graphs else 'off'}, fused kernels {'on' if self.fused else 'off'}, "
                f"mimi {mimi}")


def parse_mimi_fast(text: str | None, device: torch.device) -> tuple[str, str] | None:
    """`--mimi-fast` -> (encode, decode) weight modes, or None for the float32 reference. Default:
    DEFAULT_MIMI_FAST on CPU, None elsewhere (CUDA runs Mimi as graphs instead)."""
    if text is None:
        return DEFAULT_MIMI_FAST if device.type == "cpu" else None
    if text == "off":
        return None
    modes = tuple(text.split(","))
    if len(modes) != 2 or any(m not in WEIGHT_MODES for m in modes):
        raise ValueError(f"--mimi-fast must be 'off' or ENCODE,DECODE with modes in {WEIGHT_MODES}, got {text!r}")
    return modes


def choose(device, config: SpeedConfig = SpeedConfig()) -> Speed:
    """The paths `config` and the environment allow on `device`, before any check."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    graphs = config.cuda_graphs if config.cuda_graphs is not None else cuda and not env_disabled(cuda_graph.ENV_OFF)
    use_fused = fused.wanted(device, disabled=config.fused is False)
    mimi = parse_mimi_fast(config.mimi_fast, device) if device.type == "cpu" else None
    return Speed(device, cuda_graphs=bool(graphs), fused=use_fused, mimi_fast=mimi)


def prepare(lm, mimi, device, config: SpeedConfig = SpeedConfig()) -> tuple[object, object, Speed]:
    """(lm, mimi, speed): the models with the paths of `device` applied (`lm` or `mimi` may be None,
    e.g. `bench --codec-only`), checked on CUDA. The LM is changed in place (fused classes); a fast
    Mimi is a copy on CPU, switched in place on CUDA."""
    speed = choose(device, config)
    if speed.fused:
        for model in (lm, mimi):
            if model is not None:
                fused.apply(model)
    if speed.mimi_fast is not None and mimi is not None:
        mimi = fast_cpu(mimi, *speed.mimi_fast)
    if not config.self_check or speed.device.type != "cuda" or lm is None or not (speed.fused or speed.cuda_graphs):
        return lm, mimi, speed
    result = check_fast_paths(lm, speed.fused, speed.cuda_graphs)
    if not result.fused_ok and mimi is not None:
        fused.unapply(mimi)  # the LM's were switched back by the check
    report(result)
    return lm, mimi, Speed(speed.device, speed.cuda_graphs and result.graphs_ok, speed.fused and result.fused_ok,
                           speed.mimi_fast, result)
