"""The released `model.q8.safetensors`: int8 linear weights with row-wise absmax scales, in the
bitsandbytes layout (`X.weight` int8 [out, in], `X.weight_scb` float [out]: W = q * scb / 127).
Loaded without bitsandbytes, dequantized to the run dtype."""

from __future__ import annotations

import torch

from openmoshi.loading.files import CheckpointError, Header, canonical_keys
from openmoshi.loading.formats.official import Official

SCALE_SUFFIX = ".weight_scb"


def dequantize_q8(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`X.weight` int8 and `X.weight_scb` -> float `X.weight`; other tensors as they are."""
    out = dict(state)
    for key in [k for k in state if k.endswith(SCALE_SUFFIX)]:
        name = key[: -len("_scb")]
        if name not in state:
            raise CheckpointError(f"{key!r} has no matching {name!r} in the q8 checkpoint")
        q, scb = state[name], out.pop(key)
        if q.dtype != torch.int8 or scb.shape != q.shape[:1]:
            raise CheckpointError(f"q8 weight {name!r}: expected int8 [out, in] and scales [out], got "
                                  f"{q.dtype} {tuple(q.shape)} and {tuple(scb.shape)}")
        out[name] = (q.float() * (scb.float()[:, None] / 127.0)).to(dtype)
    return out


class OfficialQ8(Official):
    name = "q8"

    def matches(self, header: Header) -> bool:
        return any(k.endswith(SCALE_SUFFIX) for k in header.tensors)

    def tensors(self, header, state, dtype):
        return canonical_keys(dequantize_q8(state, dtype))
