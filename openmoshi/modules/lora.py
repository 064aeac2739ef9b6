"""Low-rank adapters (Hu et al. 2021, "LoRA"): W x -> W x + scaling * B (A x).

Two forms of the same adapter:
- `LoRALinear` / `LoRAStacked` wrap a linear layer for training: the frozen base layer runs as it
  is and the adapter adds `scaling * B(A x)`, so no full-size weight delta is ever built (memory
  stays that of the adapter). A is initialised like a linear layer (Kaiming-uniform), B at zero,
  so a fresh adapter changes nothing. `LoRAStacked` holds one adapter per weight set of a
  `StackedLinear` (the depth transformer's per-step weights), as the official model has one
  `nn.Linear` per set.
- `LoRADelta` is a parametrization: registered on a weight, it keeps a loaded adapter apart from
  the base weight while every user of the weight sees W + scaling * B @ A.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.modules.transformer import Index, per_step


def _init_a(a: torch.Tensor) -> None:
    # As nn.Linear initialises its weight: uniform with bound 1 / sqrt(fan_in) (Kaiming, a = sqrt 5).
    for row in a.view(-1, a.shape[-2], a.shape[-1]):
        nn.init.kaiming_uniform_(row, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base`, bias included) plus a trainable adapter."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, scaling
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # [out, r]
        if not self.lora_A.is_meta:
            _init_a(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + delta * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, in the base weight's dtype (computed in float32)."""
        w = self.base.weight
        return (w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)


class LoRAStacked(nn.Module):
    """A frozen `StackedLinear` plus one trainable adapter per weight set; or any frozen layer
    with the same interface (`forward(x, index)`, `num_sets`, `in_dim`, `out_dim`), such as a
    quantized linear (QLoRA)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, scaling
        M, out_dim, in_dim = base.num_sets, base.out_dim, base.in_dim
        device = next(itertools.chain(base.parameters(), base.buffers())).device  # quantized: buffers only
        factory = {"device": device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(M, rank, in_dim, **factory))  # [M, r, in]
        self.lora_B = nn.Parameter(torch.zeros(M, out_dim, rank, **factory))  # [M, out, r]
        if not self.lora_A.is_meta:
            _init_a(self.lora_A)

    @property
    def out_dim(self) -> int:
        return self.base.out_dim

    def forward(self, x: torch.Tensor, index: Index = 0) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype).unbind(0), self.lora_B.to(x.dtype).unbind(0)  # see StackedLinear

        def delta(x, i):
            return F.linear(F.linear(x, a[i]), b[i])
        return self.base(x, index) + per_step(delta, x, index) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        delta = torch.bmm(self.lora_B.float(), self.lora_A.float()).reshape(w.shape)  # [M * out, in]
        return (w.float() + self.scaling * delta).to(w.dtype)


class LoRADelta(nn.Module):
    """W -> W + scaling * B @ A on rows [start, start + B.shape[0]) (one weight set of a stacked
    projection, or the whole weight)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, start: int = 0):
        super().__init__()
        self.lora_A = nn.Parameter(a)  # [rank, in]
        self.lora_B = nn.Parameter(b)  # [out, rank]
        self.scaling, self.start = scaling, start

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).to(w.dtype) * self.scaling
        if self.start == 0 and delta.shape[0] == w.shape[0]:
            return w + delta
        stop = self.start + delta.shape[0]
        return torch.cat([w[:self.start], w[self.start:stop] + delta, w[stop:]], dim=0)
