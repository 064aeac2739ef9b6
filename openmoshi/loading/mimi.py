"""Mimi from an official `tokenizer-*.safetensors` (`tokenizer-e351c8d8-checkpoint125.safetensors`)."""

from __future__ import annotations

from pathlib import Path

import torch

from openmoshi.errors import UserError
from openmoshi.loading.files import canonical_keys, load_state_strict, read_safetensors
from openmoshi.mimi.codec import Mimi
from openmoshi.mimi.config import MimiConfig


def load_mimi(path: str | Path | None, num_codebooks: int = 8, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, config: MimiConfig | None = None) -> Mimi:
    """Mimi with `num_codebooks` codebooks in use (random weights when path is None)."""
    cfg = MimiConfig.default() if config is None else config
    q = cfg.quantizer
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or \
            not q.n_q_semantic <= num_codebooks <= q.n_q:
        raise UserError(f"Mimi has {q.n_q} codebooks: num_codebooks must be an integer from {q.n_q_semantic} "
                        f"to {q.n_q}, got {num_codebooks!r}")
    with torch.device(device):
        model = Mimi(cfg)
    if path is not None:
        state = canonical_keys(read_safetensors(path, device))
        load_state_strict(model, state, path)
    model.set_num_codebooks(num_codebooks)
    return model.to(dtype).eval()
