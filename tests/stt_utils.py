"""Kyutai STT fixtures: small random checkpoints in the released layout, and the official loop on them.

`make_stt(folder)` writes what `kyutai/stt-1b-en_fr` ships, at tiny size: config.json with
`model_type: "stt"`, `stt_config` and the extra heads' keys, the LM (the official LMModel with random
weights), a small random official Mimi and a SentencePiece model. A random LM rarely emits the
padding (3) and end-of-padding (0) ids that delimit words, so their rows of the text head are scaled
up: the text then has words, pauses and word ends, like a trained model's.

`official_stt(folder, pcm)` is the oracle: the official `LMGen.step_with_extra_heads` over the
frames of the streaming policy (the first frame read twice, as `moshi.run_inference` and
moshi-server's `next_token` lag do), returning its text tokens and pause probabilities per step.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from infer_utils import NAMES, STT, make_checkpoint

HEADS = dict(extra_heads_num_heads=4, extra_heads_dim=6)  # the released STT's extra heads
STT_HEADS = dict(STT, **HEADS)
DELAY_CONFIG = {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}  # as stt-1b-en_fr
WORD_IDS_SCALE = 4.0  # text-head rows of ids 0 and 3 scaled by this


def make_stt(folder: Path, seed: int = 0, stt_config: dict | None = None, lm_kwargs: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    make_checkpoint(folder, "stt", seed=seed, lm_kwargs=lm_kwargs or STT_HEADS, small_mimi=True)
    weights = folder / NAMES["moshi_name"]
    sd = load_file(str(weights))
    w = sd["text_linear.weight"].clone()
    w[[0, 3]] *= WORD_IDS_SCALE
    sd["text_linear.weight"] = w
    save_file(sd, str(weights))
    config = json.loads((folder / "config.json").read_text())
    config["stt_config"] = dict(stt_config or DELAY_CONFIG)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@functools.lru_cache(maxsize=4)
def official_models(folder: Path, device: str = "cpu", dtype=torch.float32):
    """(CheckpointInfo, Mimi, LMModel) of the official package on a checkpoint folder (cached:
    the official streaming contexts reset their state on entry)."""
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"],
                                               folder / NAMES["mimi_name"], folder / NAMES["tokenizer_name"],
                                               folder / "config.json", mimi_config_path=folder / "mimi.json")
    return info, info.get_mimi(device=device), info.get_moshi(device=device, dtype=dtype)


@torch.no_grad()
def official_stt(folder: Path, pcm: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor]]:
    """pcm [B, N] (whole frames) -> (text tokens per item, per step; prs [B, H, E] per step)."""
    from moshi.models import LMGen

    _, mimi, lm = official_models(folder)
    gen = LMGen(lm, temp=0.0, temp_text=0.0, use_sampling=False)
    B, frames = pcm.shape[0], pcm.shape[-1] // 1920
    tokens, prs = [[] for _ in range(B)], []
    with mimi.streaming(B), gen.streaming(B):
        codes = [mimi.encode(pcm[:, None, f * 1920:(f + 1) * 1920]) for f in range(frames)]
        for codes_f in [codes[0]] + codes:  # the first frame twice: step 0 reads initial tokens
            out, heads = gen.step_with_extra_heads(codes_f)
            for b in range(B):
                tokens[b].append(int(out[b, 0, 0]))
            prs.append(torch.stack([h[:, 0] for h in heads], dim=1))  # [B, H, E]
    return tokens, prs
