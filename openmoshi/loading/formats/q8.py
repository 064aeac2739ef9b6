"""The released `model.q8.safetensors`: every linear layer's weight in int8 with row-wise absmax
scales, as bitsandbytes stores it: `X.weight` int8 [out, in] and `X.weight_scb` float [out], W =
q * scb / 127; the attention projections either stacked over their weight sets (the released
`in_proj_weight` / `in_proj_weight_scb`) or one per set (`in_projs.{i}.weight` / `..._scb`).

That is our int8 weight-only format exactly (per output row, scale = scb / 127), so the layers
load straight into `accel.quantize.QuantizedLinear` without bitsandbytes and without a float copy:
the model holds 8 bits per weight, as the official package on CUDA does.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from openmoshi.accel.quantize import QuantizedLinear
from openmoshi.loading.files import CheckpointError, Header, canonical_keys
from openmoshi.loading.formats.official import Official

SCALE_SUFFIX = "_scb"
_STACKED = re.compile(r"^(.*)\.(in|out)_proj(?:s\.\d+\.weight|_weight|\.weight)$")


def _layer(weight_key: str) -> str:
    """Our module holding an official weight key: X.in_projs.{i}.weight and the released
    X.in_proj_weight are X.in_proj; X.weight is X."""
    m = _STACKED.match(weight_key)
    if m:
        return f"{m.group(1)}.{m.group(2)}_proj"
    if not weight_key.endswith(".weight"):
        raise CheckpointError(f"q8 scale for {weight_key!r}, which is not a linear layer's weight")
    return weight_key[: -len(".weight")]


def quantized_layers(header: Header) -> set[str]:
    return {_layer(k[: -len(SCALE_SUFFIX)]) for k in header.tensors if k.endswith(SCALE_SUFFIX)}


def dequantize_q8(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`X.weight` int8 and `X.weight_scb` -> float `X.weight`; other tensors as they are (any naming).
    For tests and tools: loading keeps the int8 weights."""
    out = dict(state)
    for key in [k for k in state if k.endswith(SCALE_SUFFIX)]:
        name = key[: -len(SCALE_SUFFIX)]
        if name not in state:
            raise CheckpointError(f"{key!r} has no matching {name!r} in the q8 checkpoint")
        q, scb = state[name], out.pop(key)
        _check(name, q, scb)
        out[name] = (q.float() * (scb.float()[:, None] / 127.0)).to(dtype)
    return out


def _check(name: str, q: torch.Tensor, scb: torch.Tensor) -> None:
    if q.dtype != torch.int8 or q.dim() != 2 or scb.shape != q.shape[:1]:
        raise CheckpointError(f"q8 weight {name!r}: expected int8 [out, in] and scales [out], got "
                              f"{q.dtype} {tuple(q.shape)} and {tuple(scb.shape)}")


class OfficialQ8(Official):
    name = "q8"

    def matches(self, header: Header) -> bool:
        return any(k.endswith(SCALE_SUFFIX) for k in header.tensors)

    def options(self, header, lora, quantize):
        if quantize not in (None, "int8"):
            raise CheckpointError(f"{header.path} is the int8 (q8) release: leave out --quantize {quantize} "
                                  f"(or give --quantize int8), or make an {quantize} file from the float "
                                  f"checkpoint with 'openmoshi quantize --mode {quantize}'")
        if lora is not None:
            raise CheckpointError(f"{header.path} holds int8 weights: a LoRA adapter cannot be merged into them; "
                                  "load the float checkpoint (model.safetensors) with --lora-weight")
        return None, None

    def tensors(self, header, state, dtype):
        scales = {k[: -len(SCALE_SUFFIX)]: state.pop(k) for k in [k for k in state if k.endswith(SCALE_SUFFIX)]}
        for name, scb in scales.items():
            if name not in state:
                raise CheckpointError(f"{header.path}: {name + SCALE_SUFFIX!r} has no matching {name!r}")
            _check(name, state[name], scb)
        state = canonical_keys(state)  # int8 weight sets are stacked like float ones
        for key, scb in canonical_keys(scales).items():  # the scales' sets stack the same way
            layer = key[: -len(".weight")]
            state[f"{layer}.qweight"] = state.pop(key)
            state[f"{layer}.scale"] = scb.float() / 127.0
        return state

    def prepare(self, header, model):
        layers = quantized_layers(header)
        kept = []
        for name in sorted(layers):
            parent_name, _, attr = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name) if parent_name else model
                old = getattr(parent, attr)
            except AttributeError:
                raise CheckpointError(f"{header.path}: q8 weight {name!r} names no layer of this model; "
                                      "is this the right file for this model and config?") from None
            if isinstance(old, nn.Linear) and old.bias is not None:
                raise CheckpointError(f"{header.path}: q8 layer {name!r} has a bias, which the int8 format has not")
            num_sets = old.weight.shape[0] // old.out_dim if hasattr(old, "out_dim") else 1
            setattr(parent, attr, QuantizedLinear.from_weight(old.weight, "int8", num_sets))
            kept.append(f"{name}.scale")
        model.quantization = ("int8", 0)
        return tuple(kept)  # the scales stay float32
