"""LoRA adapter files in the official layout (`X.lora_A.weight`, `X.lora_B.weight`, one pair per
linear layer, as moshi-finetune writes them), applied to a loaded LM."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from openmoshi.loading.files import CheckpointError, read_safetensors
from openmoshi.modules.lora import LoRADelta


def _lora_target(model: nn.Module, name: str) -> tuple[nn.Module, str, int]:
    """Official LoRA module path -> (module owning the weight, parameter name, first row)."""
    m = re.match(r"^(.*)\.(in|out)_projs?(?:\.(\d+))?$", name)
    if m:
        attn = model.get_submodule(m.group(1))
        index = int(m.group(3) or 0)
        proj = attn.in_proj if m.group(2) == "in" else attn.out_proj
        return proj, "weight", index * proj.out_dim
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise AttributeError(name)
    return module, "weight", 0


def apply_lora(model: nn.Module, path: str | Path, scaling: float = 2.0, fuse: bool = True) -> None:
    """Adds the adapters of a LoRA safetensors file, merged into the weights (`fuse`) or kept apart
    as parametrizations."""
    state = read_safetensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", key)
        if not m:
            raise CheckpointError(f"{path}: unexpected key {key!r} in a LoRA file (expected *.lora_A.weight "
                                  f"and *.lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: {name} has {sorted(ab)} but needs both lora_A and lora_B")
        try:
            module, pname, start = _lora_target(model, name)
        except AttributeError:
            raise CheckpointError(f"{path}: key {name + '.lora_A.weight'!r} names no linear layer of the model") from None
        w = getattr(module, pname)
        a, b = ab["lora_A"].to(w.device, torch.float32), ab["lora_B"].to(w.device, torch.float32)
        if a.shape[1] != w.shape[1] or b.shape[1] != a.shape[0] or start + b.shape[0] > w.shape[0]:
            raise CheckpointError(f"{path}: adapter {name} with A {tuple(a.shape)} and B {tuple(b.shape)} "
                                  f"does not fit a weight of shape {tuple(w.shape)}")
        delta = LoRADelta(a, b, scaling, start)
        if fuse:
            with torch.no_grad():
                w.copy_(delta(w.float()).to(w.dtype))
        else:
            parametrize.register_parametrization(module, pname, delta)
