"""The speed paths of a streaming model, in one place: which apply on a device, what each swaps, what
the start-up self-check said. The eager modules stay the definition; nothing else decides.

    lm, mimi, speed = prepare(lm, mimi, device, SpeedConfig(cuda_graphs=False))
    speed.cuda_graphs, speed.fused, speed.mimi_fast   # what runs; an Engine wraps its steps accordingly
    speed.describe()                                   # one line for logs and `bench`

The registry (`PATHS`):

    path         device  what is swapped                                           off with
    fused        cuda    the LM's and Mimi's norms, attention (RoPE + KV-cache        --no-fused,
                         writes), gating and residual + norm: module classes in place  OPENMOSHI_NO_FUSED_KERNELS=1
    mimi_cpu     cpu     Mimi's large matmuls, in a copy (`accel.mimi_cpu`), when      --mimi-fast off
                         measured faster on this CPU (`autotune`, --mimi-fast auto)
    cuda_graphs  cuda    Mimi encode, LM step, Mimi decode captured at the call site  --no-cuda-graph,
                         (`accel.cuda_graph`, one graph per bucket and window)         OPENMOSHI_NO_CUDA_GRAPH=1

On CUDA, what is switched on is then checked against the reference (`accel.self_check`): whatever
fails is switched off with one warning, and `Speed` says so. The environment switches are read here
and nowhere else on the serving and inference paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from openmoshi.accel import cuda_graph, fused
from openmoshi.accel.env import env_disabled
from openmoshi.accel.mimi_cpu import WEIGHT_MODES, fast_cpu
from openmoshi.accel.self_check import CheckResult, check_fast_paths, report
from openmoshi.engine.autotune import Choice, choose_mimi_fast
from openmoshi.errors import UserError

log = logging.getLogger("openmoshi.engine")


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
AUTO = "auto"  # the CPU default for Mimi: whichever of the reference and the fast path is faster here


@dataclass(frozen=True)
class SpeedConfig:
    """What a command asks for; None: the device's default (every path that applies, unless the
    environment turns it off)."""

    cuda_graphs: bool | None = None
    fused: bool | None = None
    mimi_fast: str | None = None  # "auto" (the CPU default), "ENC,DEC" weight modes of `mimi_cpu.fast_cpu`, or "off"
    self_check: bool = True


@dataclass(frozen=True)
class Speed:
    """What runs on `device`, decided once (see the module doc)."""

    device: torch.device
    cuda_graphs: bool = False
    fused: bool = False
    mimi_fast: tuple[str, str] | str | None = None  # "auto" until `prepare` has measured
    check: CheckResult | None = None
    mimi_choice: Choice | None = None  # what `auto` measured (or found in its cache)

    def describe(self) -> str:
        mimi = "fast " + ",".join(self.mimi_fast) if isinstance(self.mimi_fast, tuple) else (
            "auto" if self.mimi_fast == AUTO else "float32 reference")
        text = (f"cuda graphs {'on' if self.cuda_graphs else 'off'}, fused kernels {'on' if self.fused else 'off'}, "
                f"mimi {mimi}")
        return text + (f" ({self.mimi_choice.describe()})" if self.mimi_choice is not None else "")


def parse_mimi_fast(text: str | None, device: torch.device) -> tuple[str, str] | str | None:
    """`--mimi-fast` -> (encode, decode) weight modes, "auto" (measure, see `autotune`), or None for
    the float32 reference. Default: "auto" on CPU, None elsewhere (CUDA runs Mimi as graphs instead)."""
    if text is None:
        return AUTO if device.type == "cpu" else None
    if text == "off":
        return None
    if text == AUTO:
        return AUTO
    modes = tuple(text.split(","))
    if len(modes) != 2 or any(m not in WEIGHT_MODES for m in modes):
        raise UserError(f"--mimi-fast must be 'auto', 'off' or ENCODE,DECODE with modes in {WEIGHT_MODES}, "
                        f"got {text!r}")
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
    if speed.mimi_fast == AUTO:
        choice = choose_mimi_fast(mimi) if mimi is not None else None
        speed = replace(speed, mimi_fast=choice.modes if choice else None, mimi_choice=choice)
        if choice is not None:
            log.info("mimi_fast_path", extra={"fields": {"chosen": choice.name, "cached": choice.cached,
                                                         **{f"{k}_ms": v for k, v in choice.times_ms.items()}}})
    if speed.mimi_fast is not None and mimi is not None:
        mimi = fast_cpu(mimi, *speed.mimi_fast)
    if not config.self_check or speed.device.type != "cuda" or lm is None or not (speed.fused or speed.cuda_graphs):
        return lm, mimi, speed
    result = check_fast_paths(lm, speed.fused, speed.cuda_graphs)
    if not result.fused_ok and mimi is not None:
        fused.unapply(mimi)  # the LM's were switched back by the check
    report(result)
    return lm, mimi, replace(speed, cuda_graphs=speed.cuda_graphs and result.graphs_ok,
                             fused=speed.fused and result.fused_ok, check=result)
