"""LoRA on every linear layer of the LM, as the official LoRA does it, and its files.

`add_lora` swaps each `nn.Linear` of the model (both transformers, the depth transformer's input
projections, embeddings' low-rank maps, the heads, the conditioners) and each weight set of a
stacked attention projection for an adapter wrapper, and freezes everything else. The official
package replaces exactly its `nn.Linear` modules, of which a stacked projection `X.in_proj` with M
weight sets is M (`X.in_projs.0` ... `X.in_projs.{M-1}`): `lora_state_dict` writes the adapters
under those names (`X.in_projs.{i}.lora_A.weight`, as moshi-finetune saves them), so that the
official loader (`get_moshi_lm(..., lora_weights=...)`, which needs an adapter for every one of its
linears) and `loading.lora.apply_lora` both read the file.
"""

from __future__ import annotations

import torch
from torch import nn

from openmoshi.accel.quantize import QuantizedLinear
from openmoshi.errors import UserError
from openmoshi.modules.lora import LoRALinear, LoRAStacked
from openmoshi.modules.transformer import StackedLinear

STACKED = ("in_proj", "out_proj")  # attention projections: one official nn.Linear per weight set
# torch's activation-checkpoint wrapper inserts this in module names; official names have none.
_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."


def add_lora(model: nn.Module, rank: int, scaling: float) -> list[nn.Module]:
    """Wraps every linear layer of `model` in place; returns the adapters. Only the adapters train."""
    model.requires_grad_(False)
    adapters = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (StackedLinear, QuantizedLinear)):  # QuantizedLinear: QLoRA
                wrapper = LoRAStacked(child, rank, scaling)
            elif isinstance(child, nn.Linear):
                wrapper = LoRALinear(child, rank, scaling)
            else:
                continue
            setattr(parent, name, wrapper)
            adapters.append(wrapper)
    if not adapters:
        raise ValueError("the model has no linear layer to adapt")
    return adapters


def official_name(name: str) -> str:
    return name.replace(_CHECKPOINT_WRAPPED, "")


def lora_state_dict(model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters of `model` in the official key names, float32 on the CPU. `params`: the
    model's `lora_A`/`lora_B` values by parameter name when they are not in the modules themselves
    (a full state dict gathered from sharded parameters)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (LoRALinear, LoRAStacked)):
            continue
        base = official_name(name)
        a = params[f"{base}.lora_A"] if params is not None else m.lora_A
        b = params[f"{base}.lora_B"] if params is not None else m.lora_B
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        parent, _, attr = base.rpartition(".")
        if attr not in STACKED:  # one weight: an nn.Linear, or one quantized from it
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            continue
        # X.in_proj -> X.in_projs.{i}
        for i in range(a.shape[0]):
            out[f"{parent}.{attr}s.{i}.lora_A.weight"] = a[i].contiguous()
            out[f"{parent}.{attr}s.{i}.lora_B.weight"] = b[i].contiguous()
    return out


def merge_lora(model: nn.Module) -> None:
    """Replaces every adapter wrapper by its base layer with the adapter merged into the weight."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, LoRAStacked)):
                if not isinstance(child.base, (nn.Linear, StackedLinear)):
                    raise UserError("adapters on quantized weights cannot be merged into them: merge them "
                                    "into the float checkpoint (openmoshi finetune export --merge)")
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(parent, name, child.base)
