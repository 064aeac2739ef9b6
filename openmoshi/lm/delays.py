"""Delay bookkeeping between "frame time" and the delayed streams the LM reads (pure helpers).

Stream k is read `delays[k]` steps late: the acoustic codebooks of a frame enter the model one step
after its semantic codebook and its text. Illustrated with delays [0, 1] over three frames a, b, c:

    frame time      delayed (what the model reads)
    text: a b c     a b c
    ac.:  a b c     I a b      (I: initial token; c is not read in the window)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def delay_codes(codes: torch.Tensor, delays: Sequence[int], initial: torch.Tensor) -> torch.Tensor:
    """codes [B, K, T] -> [B, K, T], stream k shifted right by delays[k], the gap filled with initial[k]."""
    B, K, T = codes.shape
    if len(delays) != K:
        raise ValueError(f"{len(delays)} delays for {K} streams")
    out = codes.clone()
    for k, d in enumerate(delays):
        if d:
            if d < T:
                out[:, k, d:] = codes[:, k, :T - d]
            out[:, k, :min(d, T)] = initial[k]
    return out


def undelay(x: torch.Tensor, delays: Sequence[int], fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, K, T, ...] in delayed time -> (x in frame time, valid mask [B, K, T]).

    The last delays[k] frames of stream k have no prediction: they are filled with `fill`.
    """
    B, K, T = x.shape[:3]
    if len(delays) != K:
        raise ValueError(f"{len(delays)} delays for {K} streams")
    mask = torch.ones(B, K, T, dtype=torch.bool, device=x.device)
    if not any(delays):
        return x, mask
    out = torch.full_like(x, fill)
    for k, d in enumerate(delays):
        d = min(d, T)
        out[:, k, :T - d] = x[:, k, d:]
        mask[:, k, T - d:] = False
    return out, mask
