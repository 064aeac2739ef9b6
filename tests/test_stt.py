"""Kyutai STT: pause probabilities, words and timings against the official package (random weights)."""

from __future__ import annotations

import pytest
import torch

from official_utils import speech
from stt_utils import official_stt, make_stt

from openmoshi.engine.engine import Engine
from openmoshi.engine.speed import SpeedConfig, choose
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files


@pytest.fixture(scope="module")
def stt_folder(tmp_path_factory):
    return make_stt(tmp_path_factory.mktemp("stt") / "ckpt", seed=3)


def _load(folder):
    return load_model(resolve_files(str(folder)), "cpu", torch.float32)


def test_extra_heads_match_official_step_with_extra_heads(stt_folder):
    """Text tokens exact and the extra heads' probabilities within 1e-5 of the official
    `LMGen.step_with_extra_heads`, step by step, for a batch of two different inputs."""
    model = _load(stt_folder)
    pcm = torch.stack([speech(1.6), speech(2.0)[-1920 * 20:]])  # [2, N], 20 frames each
    ref_tokens, ref_prs = official_stt(stt_folder, pcm)
    engine = Engine.build(model, 2, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                          SamplingConfig.greedy(), all_buckets=False)
    codes = [engine.encode(pcm[:, None, f * 1920:(f + 1) * 1920]).clone() for f in range(20)]
    tokens, prs = [[], []], []
    for c in [codes[0]] + codes:
        out = engine.step(c[:, :, 0])
        for b in range(2):
            tokens[b].append(int(out.text[b]))
        prs.append(out.prs.clone())
    assert tokens == ref_tokens
    assert {0, 3} <= set(tokens[0]) and len(set(tokens[0]) - {0, 3}) > 2  # words, pauses and word ends
    assert prs[0].shape == (2, 4, 6)
    torch.testing.assert_close(torch.stack(prs), torch.stack(ref_prs), atol=1e-5, rtol=0)


def test_models_without_extra_heads_return_no_probabilities():
    from lm_utils import tiny_lm
    from openmoshi.lm import generate as G

    lm = tiny_lm()
    state = G.init_state(lm, 1, SamplingConfig.greedy())
    assert G.step(lm, state, torch.zeros(1, 8, dtype=torch.long)).prs is None
