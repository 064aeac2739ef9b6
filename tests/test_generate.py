"""Streaming generation: per-slot reset, idle slots, long conversations, bad input."""

import pytest
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.model import LMModel
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.sampling import SamplingConfig, sample

from lm_utils import TINY_7B, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def frames(lm, state, user, active=None):
    out = []
    for t in range(user.shape[2]):
        o = G.step(lm, state, user[:, :, t], None if active is None else active[t])
        out.append((torch.cat([o.text[:, None], o.audio], 1), o.valid))
    return out


def test_reset_slot_restarts_only_that_conversation(lm):
    user = torch.randint(0, 64, (2, 8, 30))
    state = G.init_state(lm, 2, SamplingConfig.greedy())
    frames(lm, state, user[:, :, :12])
    state.reset(torch.tensor([True, False]))
    after = frames(lm, state, user[:, :, 12:])
    fresh = frames(lm, G.init_state(lm, 1, SamplingConfig.greedy()), user[:1, :, 12:])
    unbroken = frames(lm, G.init_state(lm, 1, SamplingConfig.greedy()), user[1:])
    for t, ((tok, valid), (ref, ref_valid)) in enumerate(zip(after, fresh)):
        assert valid[0] == ref_valid[0]
        if ref_valid[0]:
            assert torch.equal(tok[0], ref[0])
        assert torch.equal(tok[1], unbroken[12 + t][0][0])


def test_idle_slot_pauses_without_disturbing_others(lm):
    user = torch.randint(0, 64, (2, 8, 30))
    state = G.init_state(lm, 2, SamplingConfig.greedy())
    active = [torch.tensor([True, not (5 <= t < 15)]) for t in range(30)]
    out = frames(lm, state, user, active)
    alone0 = frames(lm, G.init_state(lm, 1, SamplingConfig.greedy()), user[:1])
    keep = [t for t in range(30) if not 5 <= t < 15]
    alone1 = frames(lm, G.init_state(lm, 1, SamplingConfig.greedy()), user[1:, :, keep])
    for t in range(30):
        assert torch.equal(out[t][0][0], alone0[t][0][0])
    for i, t in enumerate(keep):
        assert bool(out[t][1][1]) == bool(alone1[i][1][0])
        if alone1[i][1][0]:
            assert torch.equal(out[t][0][1], alone1[i][0][0])
    assert not any(bool(out[t][1][1]) for t in range(5, 15))
    assert state.streams.offset.tolist() == [30, 20]


def test_runs_far_past_the_context_window(lm):
    state = G.init_state(lm, 1)
    for t in range(5 * lm.cfg.context):
        o = G.step(lm, state, torch.randint(0, 64, (1, 8)))
    assert o.valid.all() and (o.audio >= 0).all() and (o.audio < 64).all()


def test_bad_user_codes(lm):
    state = G.init_state(lm, 2)
    with pytest.raises(ValueError, match="outside \\[0, 64\\)"):
        G.step(lm, state, torch.full((2, 8), 65))
    with pytest.raises(ValueError, match="batch 3"):
        G.step(lm, state, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="7 codebooks"):
        G.step(lm, state, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        G.step(lm, state, torch.zeros(2, 8))
    codes = torch.zeros(1, 17, 4, dtype=torch.long)
    codes[0, 5, 2] = 9999
    with pytest.raises(ValueError, match=r"codes\[0, 5, 2\] = 9999 is out of range"):
        lm(codes)


def test_per_slot_sampling_settings():
    logits = torch.randn(3, 50)
    temp = torch.tensor([0.0, 1.0, 1.0])
    top_k = torch.tensor([5, 1, 3])
    for _ in range(20):
        tok = sample(logits, temp, top_k, max_k=5)
        assert tok[0] == logits[0].argmax()  # temperature 0: greedy
        assert tok[1] == logits[1].argmax()  # top-1: greedy whatever the temperature
        assert tok[2] in logits[2].topk(3).indices
    with pytest.raises(ValueError):
        SamplingConfig(top_k=0)


def test_bounded_cache_reads_change_nothing():
    """Reading only the filled part of a long window (attend="auto") == reading the whole ring."""
    torch.manual_seed(1)
    m = LMModel(lm_config_from_dict({**TINY_7B, "context": 150})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    user = torch.randint(0, 64, (2, 8, 140))
    auto, full = G.init_state(m, 2, SamplingConfig.greedy()), G.init_state(m, 2, SamplingConfig.greedy())
    windows = set()
    for t in range(140):
        if t == 70:  # a reset keeps the bound valid: no slot is further along than the calls
            auto.reset(torch.tensor([True, False]))
            full.reset(torch.tensor([True, False]))
        windows.add(G.read_window(auto.calls, auto))
        a = G.step(m, auto, user[:, :, t])
        b = G.step(m, full, user[:, :, t], attend=None)
        assert torch.equal(a.text, b.text) and torch.equal(a.audio, b.audio) and torch.equal(a.valid, b.valid)
    assert windows == {64, 128, 150}


def test_greedy_flags_follow_the_slots_settings(lm):
    state = G.init_state(lm, 2, SamplingConfig.greedy())
    assert state.sampler.flags.greedy_text and state.sampler.flags.greedy_audio
    G.set_sampling(state, SamplingConfig(temp=0.0, temp_text=0.7), torch.tensor([True, False]))
    assert state.sampler.flags.greedy_audio and not state.sampler.flags.greedy_text
    G.set_sampling(state, SamplingConfig.greedy(), torch.tensor([True, False]))
    assert not state.sampler.flags.greedy_text  # the host does not know the other slots became greedy: sample
    G.set_sampling(state, SamplingConfig.greedy())
    assert state.sampler.flags.greedy_text
