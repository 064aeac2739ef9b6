"""The call-site speed wrapper of a loaded model for streaming use (server, offline inference).

On CPU, Mimi's streaming steps run through `mimi_cpu.fast_cpu` (same codes as the reference,
about 2x faster per frame); on CUDA, the LM's and Mimi's norms, RoPE + cache writes and gating run
as fused Triton kernels (`fused.apply`; OPENMOSHI_NO_FUSED_KERNELS=1 keeps the reference modules).
"""

from __future__ import annotations

from dataclasses import replace

from openmoshi.accel import fused
from openmoshi.accel.mimi_cpu import fast_cpu


def with_fast_streaming(model):
    """`model`: a `loading.model.LoadedModel` (any dataclass with `lm`, `mimi` and `device`);
    the same model with the fast paths of its device."""
    if model.device.type == "cuda":
        if fused.wanted(model.device):
            fused.apply(model.lm)
            fused.apply(model.mimi)
        return model
    if model.device.type == "cpu":
        return replace(model, mimi=fast_cpu(model.mimi))
    return model
