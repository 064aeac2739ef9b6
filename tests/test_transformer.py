"""Streaming equals whole-sequence, causality, per-slot reset and idle slots of the transformer."""

import pytest
import torch

from openmoshi.modules.transformer import Transformer, TransformerConfig

CONFIGS = {
    "mimi_like": TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, context=6,
                                   norm="layer_norm", layer_scale=0.1),
    "lm_like": TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=132, context=6,
                                 norm="rms_norm_f32", gating="silu", kv_repeat=2),
    "sin": TransformerConfig(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, context=None,
                             positional_embedding="sin"),
}


def model(name):
    torch.manual_seed(0)
    m = Transformer(CONFIGS[name]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_equals_whole(name, chunk):
    m = model(name)
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        whole = m(x)
        state = m.init_state(2, capacity=None if m.cfg.context else 32, max_chunk=2)
        streamed = torch.cat([m(x[:, i:i + chunk], state) for i in range(0, 23, chunk)], dim=1)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_by_gradient(name):
    m = model(name)
    x = torch.randn(1, 12, 32, requires_grad=True)
    m(x)[0, 7].sum().backward()
    grad = x.grad[0].abs().sum(-1)
    assert (grad[8:] == 0).all()
    assert (grad[:8] > 0).sum() >= min(8, m.cfg.context or 8)
    if m.cfg.context:  # the window: each layer reaches context - 1 steps further back
        oldest = 7 - m.cfg.num_layers * (m.cfg.context - 1)
        assert (grad[:max(oldest, 0)] == 0).all() and grad[max(oldest, 0)] > 0


def test_reset_one_slot_matches_fresh_state():
    m = model("lm_like")
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        state = m.init_state(2)
        for t in range(7):
            m(x[:, t:t + 1], state)
        state.reset(torch.tensor([False, True]))
        fresh = m.init_state(1)
        for t in range(5):
            y = m(x[:, t:t + 1], state)
            ref = m(x[1:, t:t + 1], fresh)
            torch.testing.assert_close(y[1:], ref)
        assert state.offset.tolist() == [12, 5]


def test_idle_slot_keeps_its_state_and_disturbs_nobody():
    m = model("lm_like")
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        state, ref_state = m.init_state(2), m.init_state(2)
        outs, refs = [], []
        for t in range(12):
            idle = 3 <= t < 6
            active = torch.tensor([True, not idle])
            outs.append(m(x[:, t:t + 1], state, active))
        # Reference: slot 0 sees every step, slot 1 never sees steps 3..5.
        y0 = m(x[:1])
        keep = [t for t in range(12) if not 3 <= t < 6]
        y1 = m(x[1:, keep])
    out = torch.cat(outs, dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:, keep], y1, rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(d_model=30, num_heads=4, num_layers=1, dim_feedforward=8)
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(d_model=32, num_heads=4, num_layers=1, dim_feedforward=8, norm="batch_norm")
