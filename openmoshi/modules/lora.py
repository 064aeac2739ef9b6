"""Low-rank adapters (Hu et al. 2021, "LoRA"): W -> W + scaling * B @ A.

`LoRADelta` is a parametrization: registered on a weight, it keeps the adapter apart from the base
weight (trainable, removable) while every user of the weight sees the adapted value.
"""

from __future__ import annotations

import torch
from torch import nn


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
