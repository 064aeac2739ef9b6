"""A whole model (LM, Mimi, text tokenizer) from the files `resolve` found.

    files = resolve.resolve_files(hf_repo="kyutai/moshiko-pytorch-bf16")
    model = load_model(files, device="cuda")          # LoadedModel: .lm, .mimi, .tokenizer, ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from openmoshi.lm.config import TEXT_EOS_ID, TEXT_PADDING_ID, ConfigError, ModelConfig
from openmoshi.lm.model import LMModel
from openmoshi.loading.lm import load_lm
from openmoshi.loading.mimi import load_mimi
from openmoshi.loading.resolve import ModelFiles, resolve_device, resolve_dtype
from openmoshi.loading.tokenizer import load_text_tokenizer
from openmoshi.mimi.codec import Mimi
from openmoshi.mimi.config import mimi_config_from_dict


@dataclass(frozen=True)
class LoadedModel:
    lm: LMModel
    mimi: Mimi
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    config: ModelConfig
    files: ModelFiles
    device: torch.device
    dtype: torch.dtype


def load_model(files: ModelFiles, device=None, dtype=None, quantize: str | None = None) -> LoadedModel:
    """LM, Mimi and text tokenizer of `files`. device/dtype: torch objects or names (None: default).
    Mimi runs in float32 whatever the LM dtype, like the official tools. `quantize`: "int8"/"int4"
    weight-only quantization of the LM's transformer layers."""
    device = resolve_device(device if device is None or isinstance(device, str) else str(device))
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, device)
    cfg = files.config
    lm = load_lm(files.moshi_weight, cfg.lm, device, dtype, lora=files.lora_weight,
                 lora_scaling=cfg.lora_scaling, quantize=quantize)
    if cfg.model_type == "hibiki":
        # As the official loader: an early text EOS reads like padding until the input ends.
        with torch.no_grad():
            lm.text_emb.weight[TEXT_EOS_ID] = lm.text_emb.weight[TEXT_PADDING_ID]
    mimi_config = None
    if files.mimi_config is not None:
        try:
            mimi_config = mimi_config_from_dict(json.loads(files.mimi_config.read_text()))
        except (ValueError, TypeError) as e:  # not JSON, or keys and values Mimi's config refuses
            raise ConfigError(f"{files.mimi_config}: {e}") from None
    mimi = load_mimi(files.mimi_weight, cfg.mimi_codebooks, device, torch.float32, config=mimi_config)
    tokenizer = load_text_tokenizer(files.tokenizer)
    return LoadedModel(lm=lm, mimi=mimi, tokenizer=tokenizer, config=cfg, files=files,
                       device=device, dtype=dtype)
