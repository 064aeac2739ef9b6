"""NVIDIA PersonaPlex checkpoints (`nvidia/personaplex-7b-v1`): a Moshi 7B whose depth transformer
has 16 slots, the model's 8 codebooks and then the user's 8 (`LMConfig.depformer_user_slots`).

A file may hold every slot's weights, or only the first 8 (a Moshi-shaped depth transformer):
as PersonaPlex's own loader does, the weights of slot 8 + i are then copied from slot i: the
output heads `linears.{i}`, the input projections `depformer_in.{i}`, the codebook embeddings
`depformer_emb.{i}`, the per-step feed-forwards `depformer.layers.L.gating.{i}`, and the stacked
per-step attention projections (8 weight sets doubled to 16). At inference the user's slots are
forced from the input, so these copies are never used to sample; they make the layout whole.
Everything else is strict as for Moshi: a key neither in the file nor filled this way, or one the
model does not have, is an error.

`with_user_slots(fmt, expected)` wraps the file's own format (float, q8, quantized).
"""

from __future__ import annotations

import logging
import re

import torch

from openmoshi.loading.files import Header, meta_tensors
from openmoshi.loading.formats.official import Official

log = logging.getLogger("openmoshi.loading")

_PER_SLOT = re.compile(r"^(linears|depformer_in|depformer_emb|depformer\.layers\.\d+\.gating)\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^depformer\.layers\.\d+\.self_attn\.(in|out)_proj\.")


class UserSlots(Official):
    """`base` (the file's format), with the user's depth slots filled from the model's."""

    name = "personaplex"

    def __init__(self, base: Official, expected: dict[str, torch.Tensor], user_slots: int):
        self.base, self.expected, self.user_slots = base, expected, user_slots
        self._in_file: set[str] | None = None  # the file's keys in our naming
        self.filled = 0

    def matches(self, header: Header) -> bool:
        return self.base.matches(header)

    def options(self, header, lora, quantize):
        return self.base.options(header, lora, quantize)

    def prepare(self, header, model):
        return self.base.prepare(header, model)

    def mismatch(self, header, cfg):
        return self.base.mismatch(header, cfg)

    def tensors(self, header: Header, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self._in_file is None:
            self._in_file = set(self.base.tensors(header, meta_tensors(header), dtype))
        out = self.base.tensors(header, state, dtype)
        U = self.user_slots
        for key, value in list(out.items()):
            m = _PER_SLOT.match(key)
            if m and int(m.group(2)) < U:
                target = f"{m.group(1)}.{int(m.group(2)) + U}.{m.group(3)}"
                if target in self.expected and target not in self._in_file:
                    out[target] = value if value.is_meta else value.clone()
                    self.filled += not value.is_meta
            elif _STACKED.match(key) and key in self.expected:
                want = self.expected[key].shape[0]
                if value.dim() >= 1 and value.shape[0] * 2 == want:  # the model's 8 sets: 16 wanted
                    out[key] = torch.cat([value, value], dim=0)
                    self.filled += not value.is_meta
        return out


def with_user_slots(fmt: Official, expected: dict[str, torch.Tensor], user_slots: int) -> UserSlots:
    """The format of a PersonaPlex file: `fmt` with the user's slots filled (see the module doc).
    `expected`: the model's state dict (meta tensors will do)."""
    return UserSlots(fmt, expected, user_slots)


def report(fmt: Official, path) -> None:
    if isinstance(fmt, UserSlots) and fmt.filled:
        log.info("personaplex_user_slots_filled", extra={"fields": {
            "file": str(path), "tensors": fmt.filled}})
