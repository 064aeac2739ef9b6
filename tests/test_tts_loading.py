"""Kyutai TTS checkpoints and voices: the official key names load (released and `state_dict()`
spellings), the model's keys are the official model's, and what cannot be used is refused with a
message that names it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from openmoshi.errors import UnsupportedError
from openmoshi.lm.config import parse_model_config
from openmoshi.lm.model import LMModel
from openmoshi.lm.tts import TTSError, tts_spec
from openmoshi.loading.files import CheckpointError, canonical_keys
from openmoshi.loading.lm import load_lm
from openmoshi.loading.tts_voices import load_speaker_embedding, resolve_tts_voice, voice_suffix
from openmoshi.loading.voices import VoiceError

from lm_utils import make_official_lm
from tts_utils import EMB, EPOCH, KINDS, SIG, make_voice

OFFICIAL_EMB = {("demux_second_text_stream" if k == "demux_second_stream" else k): v for k, v in EMB.items()}


def config(kind="emb", **changes):
    kwargs, tts = KINDS[kind]
    raw = dict(copy.deepcopy(kwargs), model_type="tts", tts_config=dict(tts), model_id={"sig": SIG, "epoch": EPOCH})
    raw.update(changes)
    return parse_model_config(raw)


def test_keys_are_the_official_models_and_both_spellings_load(tmp_path):
    official = make_official_lm(OFFICIAL_EMB, seed=1)
    state = {k: v.contiguous() for k, v in official.state_dict().items()}
    with torch.device("meta"):
        ours = LMModel(config().lm)
    assert set(ours.state_dict()) == set(canonical_keys(state))
    assert any(".cross_attention.in_proj" in k for k in ours.state_dict())
    assert any(k.endswith("norm_cross.weight") for k in ours.state_dict())
    save_file(state, str(tmp_path / "official.safetensors"))  # in_projs.0.weight, as state_dict() names them
    lm = load_lm(tmp_path / "official.safetensors", config().lm, dtype=torch.float32)
    x = torch.randn(1, 5, 64)
    src = torch.randn(1, 30, 64)
    with torch.no_grad():
        ref = official.transformer(x, cross_attention_src=src)
        out = lm.transformer(x, cross_src=src)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert lm.condition_provider.conditioners["speaker_wavs"].output_proj.weight.dtype == torch.float32


def test_a_file_without_the_cross_attention_is_refused(tmp_path):
    state = {k: v for k, v in make_official_lm(OFFICIAL_EMB, seed=1).state_dict().items() if "cross" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="missing key .*cross_attention"):
        load_lm(tmp_path / "m.safetensors", config().lm, dtype=torch.float32)


def test_the_plain_moshi_layers_have_no_cross_attention():
    from lm_utils import tiny_lm

    assert not any("cross" in k for k in tiny_lm().state_dict())


@pytest.mark.parametrize("change, error, message", [
    ({"tts_config": {"audio_delay": 1.28, "multistream": True}}, UnsupportedError, "multistream"),
    ({"tts_config": {"audio_delay": 1.28, "speed": 2}}, TTSError, "unknown tts_config key 'speed'"),
    ({"tts_config": {}}, TTSError, "not a TTS model"),
    ({"model_type": "moshi", "tts_config": {}}, TTSError, "not a TTS model"),
    ({"tts_config": {"audio_delay": "1.28"}}, TTSError, "tts_config.audio_delay must be a number"),
    ({"tts_config": {"audio_delay": 1.28, "max_speakers": 0}}, TTSError, "tts_config.max_speakers must be"),
])
def test_configs_it_cannot_run_are_refused(change, error, message):
    with pytest.raises(error, match=message):
        tts_spec(config(**change))


def test_spec_of_the_released_layouts():
    emb, prefix = tts_spec(config("emb")), tts_spec(config("prefix"))
    assert (emb.delay_steps, emb.second_stream_ahead, emb.max_speakers, emb.multi_speaker) == (4, 2, 5, True)
    assert emb.cfg_values == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0) and emb.card == 101
    assert (prefix.delay_steps, prefix.multi_speaker, prefix.cfg_values) == (3, False, ())
    assert tts_spec(config(tts_config={"audio_delay": 1.28, "second_stream_ahead": 2, "max_speakers": 3})).max_speakers == 3
    # The released 1.6B: audio_delay 1.28 s is 16 frames.
    assert tts_spec(config(tts_config={"audio_delay": 1.28, "second_stream_ahead": 2})).delay_steps == 16


def test_voices(tmp_path):
    cfg = config()
    assert voice_suffix(cfg) == f".{SIG}@{EPOCH}.safetensors" and voice_suffix(config("prefix")) == ""
    path = make_voice(tmp_path / "v" / "expresso", "ex03.wav", 1)
    assert resolve_tts_voice("expresso/ex03.wav", cfg, str(tmp_path / "v")) == path
    assert resolve_tts_voice(str(path), cfg, None) == path and resolve_tts_voice(f"file://{path}", cfg, None) == path
    assert load_speaker_embedding(path).shape == (512, 6)
    with pytest.raises(VoiceError, match="no model_id"):
        voice_suffix(config(model_id={}))
    with pytest.raises(VoiceError, match=r"voice 'nobody' not found: no nobody\.0badc0de@7\.safetensors"):
        resolve_tts_voice("nobody", cfg, str(tmp_path / "v"))
    bad = tmp_path / "bad.safetensors"
    save_file({"speaker_wavs": torch.zeros(1, 256, 4)}, str(bad))
    with pytest.raises(VoiceError, match=r"shape \[1, 256, 4\], expected \[1, 512, T\]"):
        load_speaker_embedding(bad)
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(VoiceError, match="no 'speaker_wavs' tensor"):
        load_speaker_embedding(bad)
    bad.write_bytes(b"not a file")
    with pytest.raises(VoiceError, match="bad.safetensors"):
        load_speaker_embedding(bad)


def test_condition_errors():
    from openmoshi.lm.tts import condition_values

    spec = tts_spec(config())
    with pytest.raises(TTSError, match="needs a voice"):
        condition_values(spec, [], 2.0)
    with pytest.raises(TTSError, match="at most 5 speakers"):
        condition_values(spec, [torch.zeros(512, 2)] * 6, 2.0)
    with pytest.raises(TTSError, match="not one this model was trained with"):
        condition_values(spec, [torch.zeros(512, 2)], 2.2)
    with pytest.raises(TTSError, match="voices must match"):
        condition_values(spec, [torch.zeros(512, 2), torch.zeros(512, 3)], 2.0)


# kyutai/tts-1.6b-en_fr's config.json (its keys as published; the weights file
# dsm_tts_1e68beda@240.safetensors holds 418 tensors, 8 of them float32: the conditioners).
RELEASED_1_6B = {
    "card": 2048, "n_q": 32, "dep_q": 32, "delays": [0, 0] + [2] * 31, "dim": 2048, "text_card": 8000,
    "existing_text_padding_id": 3, "num_heads": 16, "num_layers": 16, "hidden_scale": 4.125, "causal": True,
    "layer_scale": None, "context": 500, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 1024, "depformer_num_heads": 16, "depformer_num_layers": 4,
    "depformer_dim_feedforward": 3072, "depformer_multi_linear": True, "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "depformer_low_rank_embeddings": 128, "demux_second_stream": True,
    "text_card_out": None, "cross_attention": True,
    "depformer_weights_per_step_schedule": list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
    "conditioners": {"speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
                     "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                                    "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}},
                     "control": {"type": "lut", "lut": {"dim": 2048, "n_bins": 1, "tokenizer": "noop", "possible_values": ["ok"]}}},
    "fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1, "sum": ["control", "cfg"],
              "prepend": [], "cross": ["speaker_wavs"]},
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2}, "model_id": {"sig": "1e68beda", "epoch": 240},
    "model_type": "tts", "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
    "tokenizer_name": "tokenizer_spm_8k_en_fr_audio.model", "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "moshi_name": "dsm_tts_1e68beda@240.safetensors"}


def test_the_released_1_6b_layout():
    """The released config builds a model whose released key names are the file's 418 tensors, 8 of
    them the float32 conditioners; the official LMModel of the same config has the same keys."""
    from moshi.models import loaders

    from openmoshi.loading.files import released_keys

    cfg = parse_model_config(copy.deepcopy(RELEASED_1_6B))
    with torch.device("meta"):
        ours = LMModel(cfg.lm)
    keys = released_keys(ours.state_dict())
    assert len(keys) == 418 and sum(k.startswith("condition_provider.") for k in keys) == 8
    assert 1.8e9 < sum(p.numel() for p in ours.parameters()) < 1.9e9
    lm_kwargs = {k: v for k, v in copy.deepcopy(RELEASED_1_6B).items()
                 if k not in ("tts_config", "model_id", "model_type", "lm_gen_config", "tokenizer_name", "mimi_name",
                              "moshi_name")}
    official = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=torch.bfloat16)
    assert set(canonical_keys(dict(official.state_dict()))) == set(ours.state_dict())
    spec = tts_spec(cfg)
    assert (spec.delay_steps, spec.second_stream_ahead, spec.card) == (16, 2, 8001)
    assert voice_suffix(cfg) == ".1e68beda@240.safetensors"
