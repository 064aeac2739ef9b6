"""Distributed set-up in one place: one process per device under torchrun, FSDP2 (`fully_shard`)
over the transformer layers, NCCL on GPUs and gloo on CPUs.

A single process (no torchrun) runs the plain model: no process group, no sharding, so a
1-process run is an independent reference for a sharded one. Under torchrun, rank 0 reads the
checkpoint and the other ranks build the model on the meta device; `fully_shard` then shards it
and rank 0's weights reach every rank by broadcast (`broadcast_from_rank0`), so no rank but 0
ever holds the whole model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from openmoshi.errors import UserError
from openmoshi.modules.transformer import Layer, Transformer


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t` (a new tensor)."""
        t = t.detach().clone()
        if self.sharded:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Raises on every rank when any rank failed, so that a bad file found by one rank never
        leaves the others waiting: a failed rank raises its own error (with its traceback), the
        others the first failed rank's, as the same UserError or OSError (one line at the command
        line), anything else as a RuntimeError naming it."""
        if not self.sharded:
            if error is not None:
                raise error
            return
        errors: list = [None] * self.world
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
        if error is not None:
            raise error
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            kind, message = first
            raise (kind(message) if issubclass(kind, (UserError, OSError)) else
                   RuntimeError(f"another process failed: {kind.__name__}: {message}"))

    def broadcast_object(self, obj):
        if not self.sharded:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str | None) -> Dist:
    """The process's place in the run; under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.sharded and dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing of every transformer layer (both transformers): their activations
    are recomputed in the backward pass instead of kept."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)

    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, Layer))


def shard(model: nn.Module, d: Dist, compute_dtype: torch.dtype) -> None:
    """FSDP2 over every transformer layer, then the rest of the model. bfloat16 compute gathers
    the parameters in bfloat16 and reduces gradients in float32, while what trains stays float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The LM's outputs are views (logits aligned by slicing); the loss never writes into them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    for m in list(model.modules()):
        if isinstance(m, Transformer):
            for layer in m.layers:  # a Layer, or its activation-checkpoint wrapper
                fully_shard(layer, mp_policy=mp)
    if getattr(model, "condition_provider", None) is not None:
        fully_shard(model.condition_provider)  # its own unit: the loop calls it outside the LM's forward
    fully_shard(model, mp_policy=mp)


def broadcast_weights(model: nn.Module, d: Dist, full_state: dict[str, torch.Tensor] | None) -> None:
    """Gives every rank its shards of rank 0's `full_state` (None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.main:
        model.to_empty(device=d.device)
    set_model_state_dict(model, full_state if d.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
