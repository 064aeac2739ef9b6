"""What a command will need in memory, known before it allocates or downloads anything, and the
check against what the machine has.

    need = Need({"LM weights (bfloat16)": lm_weight_bytes(cfg, torch.bfloat16), "Mimi": mimi_bytes()})
    check(need, device, "openmoshi serve", ["--quantize int4", "--max-sessions 2"])

The weights are counted on the model built on the meta device, exactly as loading will build it
(the checkpoint's format, the quantization asked for); the conversations' states by
`generate.state_bytes`. A margin covers the activations of one step and the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from openmoshi.accel.quantize import quantize_lm
from openmoshi.errors import UserError
from openmoshi.lm import generate as G
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel
from openmoshi.loading.files import read_header
from openmoshi.memory import available_bytes, gb
from openmoshi.mimi.codec import Mimi
from openmoshi.mimi.config import MimiConfig

MARGIN = 0.10  # of the total, for one step's activations and the allocator
MARGIN_MIN = 50e6
MIMI_STEP_BYTES = 100e6  # Mimi's activations for a few streamed frames (measured on a CPU)
SKIP_FLAG = "--skip-memory-check"


class MemoryCheckError(UserError):
    """A command that would not fit in the memory available; the message has the numbers."""


@dataclass(frozen=True)
class Need:
    parts: dict[str, float]  # what -> bytes

    @property
    def margin(self) -> float:
        return max(MARGIN_MIN, MARGIN * sum(self.parts.values()))

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + self.margin

    def describe(self) -> str:
        return ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items() if v) + f", margin {gb(self.margin)}"


def meta_lm(cfg: LMConfig, dtype: torch.dtype, quantize: str | None = None, path: str | Path | None = None) -> LMModel:
    """The LM as loading will build it (the file's format, then `quantize`), on the meta device."""
    from openmoshi.loading.lm import KEEP_FP32, checkpoint_format

    with torch.device("meta"):
        model = LMModel(cfg).to(dtype)
        for name, p in model.named_parameters():
            if name.startswith(KEEP_FP32):
                p.data = p.data.float()
        if path is not None and Path(path).is_file():
            header = read_header(path)
            checkpoint_format(header).prepare(header, model)
        if quantize and getattr(model, "quantization", None) is None:
            quantize_lm(model, quantize)
    return model


def lm_weight_bytes(cfg: LMConfig, dtype: torch.dtype, quantize: str | None = None, path=None) -> int:
    model = meta_lm(cfg, dtype, quantize, path)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def lm_state_bytes(cfg: LMConfig, dtype: torch.dtype, batch_size: int, cfg_coef: float = 1.0) -> int:
    """The streaming states of `batch_size` conversations (mostly the KV cache at full context)."""
    with torch.device("meta"):
        model = LMModel(cfg).to(dtype)
    return G.state_bytes(model, batch_size, cfg_coef)


def mimi_bytes(cfg: MimiConfig | None = None, dtype: torch.dtype = torch.float32, fast_copy: bool = False,
               streaming: bool = True) -> int:
    """Mimi's weights (twice with the CPU fast path, which keeps its own copy in a faster layout)
    and, `streaming`, the activations of a step."""
    with torch.device("meta"):
        model = Mimi(cfg or MimiConfig.default())
    weights = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * dtype.itemsize
    return weights * (2 if fast_copy else 1) + (MIMI_STEP_BYTES if streaming else 0)


def check(need: Need, device, what: str, ways_out: list[str], skip: bool = False) -> None:
    """MemoryCheckError when `need` exceeds what `device` has available (unless `skip`)."""
    if skip:
        return
    free = available_bytes(device)
    if free is None or need.total <= free:
        return
    ways = "; ".join(ways_out + [f"or {SKIP_FLAG} if you know better"])
    raise MemoryCheckError(f"{what} needs about {gb(need.total)} ({need.describe()}), but {torch.device(device)} "
                           f"has {gb(free)} available. Ways out: {ways}")
