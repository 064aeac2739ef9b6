"""`openmoshi finetune export RUN_DIR -o DIR [--merge]`: a run's checkpoint as a model folder.

DIR is laid out like a Hugging Face model repo, so `openmoshi infer --hf-repo DIR` (and the
official tools, with the same files) load it: `config.json`, the text tokenizer and Mimi (linked
or copied from the base model), and
- with --merge (or a --full run): `model.safetensors`, the base weights with the adapters merged,
  in the released key naming, and `"lora": false` in config.json (moshi-finetune's merged export
  kept `"lora": true`, which makes the official loader wrap fresh random adapters around it);
- without: the base weights as they are (`model.safetensors`), `lora.safetensors` and a config
  naming it (`"lora": true`, `lora_name`), which loaders apply on top.
DIR is written beside itself and renamed when whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from openmoshi.lm.config import parse_model_config
from openmoshi.loading.files import read_header, released_keys
from openmoshi.loading.lm import load_lm
from openmoshi.training.checkpoints import FULL_FILE, LORA_FILE, checkpoints
from openmoshi.training.loop import RUN_FILE, RunError

MODEL_FILE = "model.safetensors"


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, merge: bool = False) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise RunError(f"{run_dir} is not a fine-tuning run (no {RUN_FILE})")
    found = dict(checkpoints(run_dir))
    if not found:
        raise RunError(f"{run_dir} has no checkpoint yet")
    step = max(found) if step is None else step
    if step not in found:
        raise RunError(f"{run_dir} has no checkpoint at step {step} (it has {', '.join(map(str, sorted(found)))})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunError(f"-o {out_dir} exists and is not an empty folder")
    source = found[step] / "consolidated"
    files = json.loads(run_file.read_text())["files"]
    config = json.loads((source / "config.json").read_text())
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if (source / FULL_FILE).exists():
            _link(source / FULL_FILE, tmp / MODEL_FILE)
            config["lora"] = False
        elif merge:
            _merge(Path(files["moshi_weight"]), source / LORA_FILE, config, tmp / MODEL_FILE)
            config["lora"] = False
        else:
            _link(Path(files["moshi_weight"]), tmp / MODEL_FILE)
            _link(source / LORA_FILE, tmp / LORA_FILE)
            config["lora_name"] = LORA_FILE
        if not config.get("lora"):
            for key in ("lora_rank", "lora_scaling", "lora_name"):
                config.pop(key, None)
        config["moshi_name"] = MODEL_FILE
        for key, name in (("mimi_name", "mimi_weight"), ("tokenizer_name", "tokenizer")):
            if files.get(name):
                config[key] = Path(files[name]).name
                _link(Path(files[name]), tmp / config[key])
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _merge(base: Path, lora: Path, config: dict, out: Path) -> None:
    """base weights + adapters -> one file in the released naming, in the base file's dtype."""
    dtype = read_header(base).float_dtype or torch.bfloat16
    lm_cfg = parse_model_config(config).lm
    lm = load_lm(base, lm_cfg, "cpu", dtype, lora=lora, lora_scaling=config.get("lora_scaling", 2.0))
    state = released_keys({k: v.contiguous() for k, v in lm.state_dict().items()})
    save_file(state, str(out))


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no copy of a 15 GB file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
