"""Tiny Kyutai TTS checkpoints in the released layouts, and the official `TTSModel` on them.

Two structures, both the released models' at tiny width:
- `EMB`: `kyutai/tts-1.6b-en_fr`'s: cross-attention on speaker embeddings (`speaker_wavs`, dim 512,
  position embedding), the `cfg` (CFG distillation) and `control` lookup tables summed in, the
  second text stream two words ahead, low-rank depth embeddings, weights per step shared by a
  schedule; voices `<name>.<sig>@<epoch>.safetensors` holding `speaker_wavs` [1, 512, T].
- `PREFIX`: conditioned on an audio prefix (`kyutai/tts-0.75b-en-public`'s way): no speaker
  condition, no cfg table (guidance doubles the batch), a text output head smaller than the input
  vocabulary.
`make_tts_checkpoint(folder, kind)` writes config.json (with `tts_config`, `model_id`), the LM in
the released key naming, a small random Mimi and a SentencePiece model; `make_voice` a voice file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from infer_utils import SMALL_MIMI, _mimi, _tokenizer
from lm_utils import make_official_lm

TEXT_CARD = 100
SIG, EPOCH = "0badc0de", 7
NAMES = dict(moshi_name="dsm_tts.safetensors", mimi_name="mimi.safetensors", tokenizer_name="tok.model",
             mimi_config_name="mimi.json")
VOICE_FRAMES = 6
_BASE = dict(
    card=2048, n_q=4, dep_q=4, delays=[0, 0, 2, 2, 2], dim=64, text_card=TEXT_CARD, existing_text_padding_id=3,
    num_heads=4, num_layers=2, hidden_scale=4.125, causal=True, layer_scale=None, context=60, max_period=10000,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=32, depformer_num_heads=2,
    depformer_num_layers=1, depformer_dim_feedforward=96, depformer_multi_linear=True, depformer_pos_emb="none",
    depformer_weights_per_step=True, depformer_weights_per_step_schedule=[0, 1, 2, 2],
    depformer_low_rank_embeddings=16, text_card_out=None)
CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]
EMB = dict(
    _BASE, demux_second_stream=True, cross_attention=True,
    conditioners={"speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
                  "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop", "possible_values": CFG_VALUES}},
                  "control": {"type": "lut", "lut": {"dim": 64, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}}},
    fuser={"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1, "sum": ["control", "cfg"],
           "prepend": [], "cross": ["speaker_wavs"]})
PREFIX = dict(
    _BASE, text_card_out=8, demux_second_stream=True,
    conditioners={"control": {"type": "lut", "lut": {"dim": 64, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}}},
    fuser={"sum": ["control"], "prepend": [], "cross": []})
# A wider and deeper EMB, with 8 codebooks and the released audio delay, for the CPU benchmark.
SMALL_EMB = dict(EMB, dim=256, num_heads=8, num_layers=6, n_q=8, dep_q=8, delays=[0, 0] + [2] * 7,
                 depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2, depformer_dim_feedforward=384,
                 depformer_weights_per_step_schedule=[0, 1, 2, 3, 4, 4, 4, 4], context=500,
                 conditioners=dict(EMB["conditioners"], control={"type": "lut", "lut": {
                     "dim": 256, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}}))
KINDS = {"emb": (EMB, {"audio_delay": 0.32, "second_stream_ahead": 2}),
         "prefix": (PREFIX, {"audio_delay": 0.24, "second_stream_ahead": 1}),
         "small": (SMALL_EMB, {"audio_delay": 1.28, "second_stream_ahead": 2})}


def make_tts_checkpoint(folder: Path, kind: str = "emb", seed: int = 0) -> dict:
    """Writes a TTS checkpoint folder (see the module doc); returns the raw config."""
    from safetensors.torch import save_file

    from openmoshi.loading.files import canonical_keys, released_keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs, tts_config = KINDS[kind]
    lm = make_official_lm({("demux_second_text_stream" if k == "demux_second_stream" else k): v
                           for k, v in kwargs.items()}, seed)
    with torch.no_grad():  # PAD and NEW_WORD dominate and compete: the model picks when words start
        lm.text_linear.weight[[0, 3]] *= 6.0
    # The released files stack each attention's projections: `in_proj_weight`, `out_proj.weight`.
    state = released_keys(canonical_keys({k: v.contiguous() for k, v in lm.state_dict().items()}))
    save_file(state, str(folder / NAMES["moshi_name"]))
    mimi = folder / NAMES["mimi_name"]
    if not mimi.exists():
        mimi.hardlink_to(_mimi(seed, small=True))
    (folder / "mimi.json").write_text(json.dumps(SMALL_MIMI))
    _tokenizer(folder / NAMES["tokenizer_name"], TEXT_CARD)
    raw = dict(kwargs, model_type="tts", tts_config=tts_config, model_id={"sig": SIG, "epoch": EPOCH},
               lm_gen_config={"temp": 0.6, "text_temp": 0.6}, **NAMES)
    (folder / "config.json").write_text(json.dumps(raw))
    return raw


def make_voice(folder: Path, name: str, seed: int, frames: int = VOICE_FRAMES) -> Path:
    """A voice file as in kyutai/tts-voices: `<name>.<sig>@<epoch>.safetensors`, `speaker_wavs` [1, 512, T]."""
    from safetensors.torch import save_file

    path = Path(folder) / f"{name}.{SIG}@{EPOCH}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"speaker_wavs": torch.randn(1, 512, frames, generator=g)}, str(path),
              metadata={"sig": SIG, "epoch": str(EPOCH)})
    return path


def official_tts(folder: Path, n_q: int | None = None, device: str = "cpu", **kwargs):
    """The official TTSModel on a checkpoint folder (float32, CPU by default)."""
    from moshi.models import loaders
    from moshi.models.tts import TTSModel

    folder = Path(folder)
    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"], folder / NAMES["mimi_name"],
                                               folder / NAMES["tokenizer_name"], folder / "config.json",
                                               mimi_config_path=folder / "mimi.json")
    n_q = n_q or info.lm_config["n_q"]
    return TTSModel.from_checkpoint_info(info, n_q=n_q, device=device, dtype=torch.float32, **kwargs)
