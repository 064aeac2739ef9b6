"""The released float LM checkpoint (`model.safetensors`), and the base of every other format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from openmoshi.lm.config import LMConfig
from openmoshi.loading.files import CheckpointError, Header, canonical_keys


class Official:
    """Official key names (renamed by `canonical_keys`), float tensors in any dtype."""

    name = "official"

    def matches(self, header: Header) -> bool:
        return True

    def options(self, header: Header, lora: Path | None, quantize: str | None) -> tuple[Path | None, str | None]:
        """Checks the load options against the file: the LoRA adapter and quantization still to apply."""
        return lora, quantize

    def tensors(self, header: Header, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The file's tensors in our key names and layout."""
        return canonical_keys(state)

    def prepare(self, header: Header, model: nn.Module) -> tuple[str, ...]:
        """Changes `model` (on the meta device) to the file's module layout; returns the key
        prefixes whose floats stay float32."""
        return ()

    def mismatch(self, header: Header, cfg: LMConfig) -> CheckpointError | None:
        """A clearer error than a bad key when the file was made for another config (None: none)."""
        return None
