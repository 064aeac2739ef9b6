"""Training the LM: the training forward's gradients and the LoRA adapters against the official
package, and the loss against the formula computed independently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lm_utils import CONFIGS, make_official_lm, ours_from_official
from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID
from openmoshi.loading.files import canonical_keys
from openmoshi.training.lora import add_lora, lora_state_dict, merge_lora
from openmoshi.training.loss import loss_sums


def _codes(cfg, T=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (2, cfg.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (2, T), generator=g)
    codes[0, 0, :4] = TEXT_PADDING_ID
    codes[1, :, -3:] = -1  # a short segment's padding
    return codes


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _scalar(out):
    """A loss-like function of every valid logit."""
    return out.logits[out.mask].float().logsumexp(-1).mean() + out.text_logits[out.text_mask].float().logsumexp(-1).mean()


@pytest.mark.parametrize("name", ["tiny_7b", "golden", "tiny_2b_like"])
def test_gradients_match_official(name):
    """Full fine-tuning: every weight's gradient through our training forward == the official one."""
    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=1).train()
    ours = ours_from_official(official, kw).train()
    codes = _codes(ours.cfg)
    _scalar(official(codes)).backward()
    _scalar(ours(codes)).backward()
    ref = canonical_keys({k: p.grad for k, p in official.named_parameters() if p.grad is not None})
    got = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-4, k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_adapts_exactly_the_official_linears(name):
    """The official loader needs an adapter for each of its nn.Linear modules, and no other."""
    kw = CONFIGS[name]
    official = make_official_lm(kw)
    ours = ours_from_official(official, kw)
    add_lora(ours, 2, 2.0)
    adapted = {k.rsplit(".lora_", 1)[0] for k in lora_state_dict(ours)}
    assert adapted == {n for n, m in official.named_modules() if isinstance(m, nn.Linear)}
    assert all(p.requires_grad == (".lora_" in n) for n, p in ours.named_parameters())


@pytest.mark.parametrize("name", ["tiny_7b", "golden"])
def test_lora_forward_and_merge_match_official(name):
    from moshi.modules.lora import replace_all_linear_with_lora, replace_lora_with_linear

    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=1)
    ours = ours_from_official(official, kw)
    torch.manual_seed(3)
    adapters = add_lora(ours, 3, 1.5)
    with torch.no_grad():
        for a in adapters:
            a.lora_B.normal_(0, 0.3)  # a fresh B is zero: give the adapters something to add
    replace_all_linear_with_lora(official, 3, 1.5)
    result = official.load_state_dict(lora_state_dict(ours), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    codes = _codes(ours.cfg)
    with torch.no_grad():
        ref, out = official(codes), ours(codes)
        assert _rel(out.logits[out.mask], ref.logits[ref.mask]) < 1e-5
        assert _rel(out.text_logits[out.text_mask], ref.text_logits[ref.text_mask]) < 1e-5
        replace_lora_with_linear(official)
        merge_lora(ours)
        ref2, out2 = official(codes), ours(codes)
    assert not any(".lora_" in k for k in ours.state_dict())
    assert _rel(out2.logits[out2.mask], ref2.logits[ref2.mask]) < 1e-5
    assert _rel(out2.logits[out2.mask], out.logits[out.mask]) < 1e-5


def test_fresh_adapters_change_nothing():
    kw = CONFIGS["tiny_7b"]
    ours = ours_from_official(make_official_lm(kw), kw)
    codes = _codes(ours.cfg)
    with torch.no_grad():
        before = ours(codes).logits
        add_lora(ours, 4, 2.0)
        after = ours(codes).logits
    torch.testing.assert_close(after, before, equal_nan=True, rtol=0, atol=1e-6)  # B = 0: W x + 0


def test_loss_is_the_weighted_means_summed():
    """loss_sums against the formula written out position by position."""
    kw = CONFIGS["tiny_7b"]
    ours = ours_from_official(make_official_lm(kw), kw)
    codes = _codes(ours.cfg, T=10)
    codes[1, 0, 2:5] = TEXT_END_PADDING_ID
    with torch.no_grad():
        out = ours(codes)
    w1, wp = 7.0, 0.25
    s = loss_sums(out, codes, first_codebook_weight=w1, text_padding_weight=wp)
    text, audio = s.means()
    num = den = 0.0
    B, Q, T, _ = out.logits.shape
    for b in range(B):
        for t in range(T):
            if out.text_mask[b, 0, t]:
                target = codes[b, 0, t].item()
                w = wp if target in (TEXT_PADDING_ID, TEXT_END_PADDING_ID) else 1.0
                num += w * -torch.log_softmax(out.text_logits[b, 0, t].double(), -1)[target].item()
                den += w
    assert text.item() == pytest.approx(num / den, rel=1e-5)
    num = den = 0.0
    for b in range(B):
        for q in range(Q):
            for t in range(T):
                if out.mask[b, q, t]:
                    w = w1 if q == 0 else 1.0
                    num += w * -torch.log_softmax(out.logits[b, q, t].double(), -1)[codes[b, 1 + q, t]].item()
                    den += w
    assert audio.item() == pytest.approx(num / den, rel=1e-5)
    assert math.isfinite(text.item() + audio.item())
    # masked positions count nothing: the short segment's padded frames are not in any mask
    assert not out.mask[1, :, -3:].any() and not out.text_mask[1, :, -3:].any()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapters_over_quantized_weights_get_the_float_gradient(mode):
    """QLoRA: through a quantized layer, the input's gradient is that of the dequantized weight."""
    from openmoshi.accel.quantize import QuantizedLinear

    torch.manual_seed(0)
    q = QuantizedLinear.from_weight(torch.randn(2 * 48, 64), mode, num_sets=2, group_size=32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x, 1)
    (y * torch.arange(48.0)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, q.weight(1))
    (ref * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
