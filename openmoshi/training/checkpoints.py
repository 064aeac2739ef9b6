"""What a run saves: the outputs users load, and the state a resumed run continues from.

    RUN_DIR/checkpoints/checkpoint_000100/
        consolidated/lora.safetensors        the adapters, official key names (or, for --full,
        consolidated/config.json             consolidated.safetensors in the released naming); the
                                             model's config plus "lora", "lora_rank", "lora_scaling"
        state/                               torch.distributed.checkpoint: what trains and the
                                             optimizer, sharded as the run was; trainer.json (step,
                                             which fixes the data position and the learning rate);
                                             rng-<rank>.pt (every random generator of each rank)

A checkpoint is written into a hidden folder and renamed when every rank is done, so a folder
named checkpoint_* is always whole; an interrupted save leaves only the hidden folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from openmoshi.loading.files import released_keys
from openmoshi.training.distributed import Dist
from openmoshi.training.lora import lora_state_dict, official_name

_NAME = re.compile(r"^checkpoint_(\d{6,})$")
LORA_FILE = "lora.safetensors"
FULL_FILE = "consolidated.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The whole checkpoints of a run, by step."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def consolidated(model: nn.Module, full: bool, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The trained weights as users load them (on rank 0; None elsewhere): the adapters in the
    official names, or for a full fine-tune every weight in the released naming, in `dtype`."""
    state = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full))
    if not state:
        return None  # not rank 0
    state = {official_name(k): v for k, v in state.items()}
    if not full:
        return lora_state_dict(model, {k: v for k, v in state.items() if ".lora_" in k})
    return {k: v.to(dtype).contiguous() for k, v in released_keys(state).items()}


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist,
         model_config: dict, full: bool, lora: tuple[int, float] | None, dtype: torch.dtype) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "consolidated").mkdir(parents=True)
    d.barrier()
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    with warnings.catch_warnings():  # a single process saves without a process group, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    torch.save(_rng_state(), tmp / "state" / f"rng-{d.rank}.pt")
    weights = consolidated(model, full, dtype)
    if d.main:
        (tmp / "state" / "trainer.json").write_text(json.dumps({"step": step, "world": d.world}))
        save_file(weights, str(tmp / "consolidated" / (FULL_FILE if full else LORA_FILE)))
        config = dict(model_config)
        if lora is not None:
            config.update(lora=True, lora_rank=lora[0], lora_scaling=lora[1])
        else:
            config["lora"] = False
        (tmp / "consolidated" / "config.json").write_text(json.dumps(config, indent=2))
    d.barrier()
    if d.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    d.barrier()
    return final


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> int:
    """Loads a checkpoint's state into the model and optimizer; returns its step."""
    options = StateDictOptions(ignore_frozen_params=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "state"))  # fails on any trainable key the checkpoint lacks
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: from the base
    rng = path / "state" / f"rng-{d.rank}.pt"
    if rng.exists():  # the same number of ranks: each continues its own generators
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "state" / "trainer.json").read_text())["step"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
