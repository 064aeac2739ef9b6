"""Reading safetensors files and assigning their tensors to a model, strictly.

Every error is a `CheckpointError` that names the file and what is wrong with it. `read_header`
checks a file without reading its tensors (a truncated download, a file of another kind);
`load_state_strict` checks keys and shapes against the model before assigning anything.

The one rename table between official keys and ours lives here (`canonical_keys`): the official
code saves attention projections as one linear per weight set (`in_projs.{i}.weight`), the
released files as one stacked tensor (`in_proj_weight`); we store the stacked form as a module
(`in_proj.weight`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from openmoshi.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Header:
    """What a safetensors file says of itself, read without its tensors."""

    path: Path
    metadata: dict[str, str]  # the free-form `__metadata__` strings
    tensors: dict[str, dict]  # key -> {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The dtype most of the file's float tensors have (bfloat16 for the released models)."""
        from collections import Counter

        counts = Counter(_FLOAT_DTYPES[i["dtype"]] for i in self.tensors.values()
                         if isinstance(i, dict) and i.get("dtype") in _FLOAT_DTYPES)
        return counts.most_common(1)[0][0] if counts else None


_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPES = {**_FLOAT_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def meta_tensors(header: Header) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes; no data): what a loader checks
    before reading anything."""
    out = {}
    for key, info in header.tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{header.path}: tensor {key!r} has an unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        out[key] = torch.empty(info.get("shape", []), dtype=_DTYPES[info["dtype"]], device="meta")
    return out


def read_header(path: str | Path) -> Header:
    """The header of a safetensors file, checking that the file is whole."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                  f"(header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    for key, info in header.items():
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} needs bytes up to {end} "
                                  f"but the file holds {data_size} bytes of data; download it again")
    return Header(path, metadata if isinstance(metadata, dict) else {}, header)


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, checking first that the file is whole."""
    read_header(path)
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------- key names

_PER_SET = re.compile(r"^(.*)\.(in|out)_projs\.(\d+)\.weight$")


def canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key spellings -> ours. `X.in_projs.{i}.weight` (one per weight set) and the released
    `X.in_proj_weight` become one stacked `X.in_proj.weight`; `X.out_projs.{i}.weight` become
    `X.out_proj.weight`."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PER_SET.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = value
        elif key.endswith(".in_proj_weight"):
            out[key[: -len(".in_proj_weight")] + ".in_proj.weight"] = value
        else:
            out[key] = value
    for (prefix, kind), parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"{prefix}.{kind}_projs: weight sets {sorted(parts)} are not 0..{len(parts) - 1}")
        name = f"{prefix}.{kind}_proj.weight"
        out[name] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return out


def released_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the released spelling (`X.in_proj.weight` -> `X.in_proj_weight`), which both the
    official loader and `canonical_keys` read: how files we write for others name their keys."""
    return {(k[: -len(".in_proj.weight")] + ".in_proj_weight" if k.endswith(".in_proj.weight") else k): v
            for k, v in state.items()}


# ----------------------------------------------------------------------------- assigning


def check_tensors(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every key of `state` is one of `expected` (a model's state_dict, meta tensors will do), with
    its shape and kind of number: CheckpointError naming the first that is not."""
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}{more}; is this the right "
                              f"file for this model and config?")
    for key, ref in expected.items():  # in the model's order: the first layer's mismatch is named
        value = state.get(key)
        if value is None:
            continue
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(ref.shape)}; the config does not match this checkpoint")
        if value.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise CheckpointError(f"{source}: key {key!r} has dtype {value.dtype}, expected a "
                                  f"{'float' if ref.dtype.is_floating_point else 'integer'} tensor")


def check_complete(expected, seen, source: str | Path) -> None:
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more}; is this the right file "
                              f"for this model and config?")


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: tuple[str, ...] = ()) -> None:
    """Floats to `dtype` in place (float32 for keys starting with one of `keep_fp32`)."""
    if dtype is None:
        return
    for key, value in state.items():
        if value.dtype.is_floating_point:
            state[key] = value.float() if key.startswith(keep_fp32) else value.to(dtype)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                      dtype: torch.dtype | None = None, keep_fp32: tuple[str, ...] = ()) -> None:
    """Checks keys and shapes against `model`, casts floats to `dtype` (but keys starting with one
    of `keep_fp32`, which become float32), assigns the tensors."""
    expected = model.state_dict()
    check_complete(expected, state, source)
    check_tensors(expected, state, source)
    cast(state, dtype, keep_fp32)
    model.load_state_dict(state, strict=True, assign=True)
