"""PersonaPlex checkpoints (issue 13): dep_q = 16 depth transformer, the user's slots filled from
the model's when the file lacks them, strict otherwise; repos and folders without config.json;
the user's codebooks forced from the input at inference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lm_utils import TINY_7B, make_official_lm, ours_from_official
from openmoshi.lm import generate as G
from openmoshi.lm.config import PERSONAPLEX_7B, lm_config_from_dict, parse_model_config
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.files import CheckpointError, canonical_keys, released_keys
from openmoshi.loading.lm import load_lm
from openmoshi.loading.resolve import resolve_files
from test_resolve import REV, fake_cache, offline  # noqa: F401 (a fixture)

TINY_PP = {**TINY_7B, "dep_q": 16}  # PersonaPlex's layout at tiny width


def _save(sd: dict, path) -> None:
    """As the released files: attention weight sets stacked (`in_proj_weight`, `out_proj.weight`)."""
    save_file({k: v.contiguous() for k, v in released_keys(canonical_keys(sd)).items()}, str(path))


def _slot_keys(i: int) -> list[str]:
    """Our keys of depth slot i's own weights (the per-slot modules of the 7B's depth transformer)."""
    keys = [f"linears.{i}.weight", f"depformer_in.{i}.weight"]
    keys += [f"depformer.layers.{L}.gating.{i}.{n}.weight" for L in range(2) for n in ("linear_in", "linear_out")]
    return keys + ([f"depformer_emb.{i}.weight"] if i < 15 else [])


def test_config_json_with_dep_q_16_is_personaplex():
    cfg = parse_model_config(dict(TINY_PP))
    assert cfg.lm.depformer_user_slots == 8 and cfg.lm.gen_q == 8 and cfg.lm.num_user_codebooks == 8
    assert cfg.mimi_codebooks == 8
    assert "depformer_user_slots" not in lm_config_from_dict(TINY_7B).to_dict()  # not an official key
    assert PERSONAPLEX_7B.dep_q == 16 and PERSONAPLEX_7B.gen_q == 8


def test_full_file_loads_strictly(tmp_path):
    official = make_official_lm(TINY_PP, seed=21)
    _save(official.state_dict(), tmp_path / "model.safetensors")
    cfg = parse_model_config(dict(TINY_PP)).lm
    ours = load_lm(tmp_path / "model.safetensors", cfg, dtype=torch.float32)
    ref = ours_from_official(official, {**TINY_PP, "depformer_user_slots": 8})
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    # Strict: a key the model does not have, or a missing one that is no user slot.
    sd = official.state_dict()
    _save({**sd, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_lm(tmp_path / "extra.safetensors", cfg, dtype=torch.float32)
    _save({k: v for k, v in sd.items() if k != "out_norm.alpha"}, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="missing key 'out_norm.alpha'"):
        load_lm(tmp_path / "missing.safetensors", cfg, dtype=torch.float32)
    _save({k: v for k, v in sd.items() if not k.startswith("linears.")}, tmp_path / "nohead.safetensors")
    with pytest.raises(CheckpointError, match="missing key 'linears.0.weight'"):
        load_lm(tmp_path / "nohead.safetensors", cfg, dtype=torch.float32)


def test_missing_user_slots_are_filled_from_the_models(tmp_path):
    """PersonaPlex's layout without the user's per-step weights (slots 8..15): slot 8 + i is a copy
    of slot i, attention weight sets included; every other weight is the file's."""
    official = make_official_lm(TINY_PP, seed=22)
    full = canonical_keys(official.state_dict())
    user = {k for i in range(8, 16) for k in _slot_keys(i)}
    part = {k: v for k, v in full.items() if k not in user}
    for k in [k for k in part if k.startswith("depformer.") and ".self_attn." in k]:
        part[k] = part[k][: part[k].shape[0] // 2]  # the model's 8 weight sets
    _save(part, tmp_path / "model.safetensors")
    ours = load_lm(tmp_path / "model.safetensors", parse_model_config(dict(TINY_PP)).lm, dtype=torch.float32)
    sd = ours.state_dict()
    for key, value in part.items():
        if key.startswith("depformer.") and ".self_attn." in key:
            assert torch.equal(sd[key], torch.cat([value, value])), key
        else:
            assert torch.equal(sd[key], value), key
    for i in range(8):
        for a, b in zip(_slot_keys(8 + i), _slot_keys(i)):
            assert torch.equal(sd[a], sd[b]) and sd[a].data_ptr() != sd[b].data_ptr(), a
    # A Moshi file lacks the embedding of the model's last codebook (read by the user's first slot),
    # which nothing fills, as in PersonaPlex's loader.
    _save(canonical_keys(make_official_lm(TINY_7B, seed=25).state_dict()), tmp_path / "moshi.safetensors")
    with pytest.raises(CheckpointError, match="missing key 'depformer_emb.7.weight'"):
        load_lm(tmp_path / "moshi.safetensors", parse_model_config(dict(TINY_PP)).lm, dtype=torch.float32)


def test_user_codebooks_are_forced_from_the_input():
    """Greedy generation on a random dep_q = 16 model reads the user's codes from the input and
    samples the model's 8 codebooks: every token equals the official dep_q = 16 model's argmax
    when the conversation is teacher-forced through its training pass (which predicts the user's
    slots too: those are ignored, as the user's codebooks are never sampled)."""
    official = make_official_lm(TINY_PP, seed=23)
    ours = ours_from_official(official, {**TINY_PP, "depformer_user_slots": 8})
    cfg = ours.cfg
    B, T = 2, 14
    user = torch.randint(0, cfg.card, (B, 8, T + 1), generator=torch.Generator().manual_seed(24))
    state = G.init_state(ours, B, SamplingConfig.greedy())
    frames = []
    for s in range(T + 1):
        out = G.step(ours, state, user[:, :, s])
        assert out.audio.shape == (B, 8)
        if s >= 1:
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1))
    codes = torch.cat([torch.stack(frames, dim=-1), user[:, :, 1:]], dim=1)  # official frame j: our j + 1
    with torch.no_grad():
        ref = official(codes)
    assert torch.equal(ref.text_logits.argmax(-1)[ref.text_mask], codes[:, :1][ref.text_mask])
    mask = ref.mask[:, :8]
    assert torch.equal(ref.logits[:, :8].argmax(-1)[mask], codes[:, 1:9][mask])
    assert len(codes[:, 0].unique()) > 3


def test_repo_and_folder_without_config(offline, tmp_path):  # noqa: F811
    names = ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model")
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(b"x")
    fake_cache(offline, "nvidia/personaplex-7b-v1", {n: src / n for n in names}, no_config=True)
    files = resolve_files("nvidia/personaplex-7b-v1")
    assert files.config.lm == PERSONAPLEX_7B and files.config.mimi_codebooks == 8
    assert REV in str(files.moshi_weight)
    local = tmp_path / "personaplex-7b"
    local.mkdir()
    for n in names:
        (local / n).touch()
    assert resolve_files(str(local)).config.lm == PERSONAPLEX_7B
    (local / "config.json").write_text(json.dumps(TINY_PP))
    assert resolve_files(str(local)).config.lm.gen_q == 8
