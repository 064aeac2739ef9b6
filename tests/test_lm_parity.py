"""Parity of the LM with the official moshi 0.2.13 on random weights in the official format."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from openmoshi.lm import generate as G
from openmoshi.loading.lm import load_lm
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.sampling import SamplingConfig

from lm_utils import CONFIGS, GOLDEN, make_official_lm, official_frames, ours_from_official

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_test_assets"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = ~torch.isnan(b)
    return ((a[ok] - b[ok]).abs().max() / b[ok].abs().max()).item()


def test_golden_assets():
    """The official check: masks equal, per-codebook cross-entropy within 1e-6 relative."""
    if not ASSETS.exists():
        pytest.skip(f"golden assets not found at {ASSETS}")
    lm = load_lm(ASSETS / "test_lm_model.safetensors", lm_config_from_dict(GOLDEN), dtype=torch.float32)
    codes = load_file(str(ASSETS / "test_lm_codes.safetensors"))["codes"]
    ref = load_file(str(ASSETS / "test_lm_out.safetensors"))
    with torch.no_grad():
        out = lm(codes)
    for logits, mask, ref_logits, ref_mask, targets in (
            (out.logits, out.mask, ref["logits"], ref["mask"], codes[:, 1:]),
            (out.text_logits, out.text_mask, ref["text_logits"], ref["text_mask"], codes[:, :1])):
        assert torch.equal(mask, ref_mask.bool())
        for k in range(logits.shape[1]):
            m = mask[:, k]
            ce = F.cross_entropy(logits[:, k][m], targets[:, k][m])
            ref_ce = F.cross_entropy(ref_logits[:, k][m], targets[:, k][m])
            assert abs(ce - ref_ce) <= 1e-6 * ref_ce


@pytest.mark.parametrize("name", ["tiny_7b", "golden", "tiny_2b_like", "tiny_2b_dep_no_scale"])
def test_training_logits_match_official(name):
    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=1)
    ours = ours_from_official(official, kw)
    K = ours.cfg.num_codebooks
    torch.manual_seed(2)
    codes = torch.randint(0, ours.cfg.card, (2, K, 30))
    codes[:, 0] = torch.randint(0, ours.cfg.text_card, (2, 30))
    codes[0, 3, 5] = -1  # a "no input" token
    with torch.no_grad():
        ref, out = official(codes), ours(codes)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.text_mask, ref.text_mask)
    assert rel(out.logits, ref.logits) < 1e-5
    assert rel(out.text_logits, ref.text_logits) < 1e-5


def run_official(official, user, sampling: SamplingConfig | None, seed=0):
    from moshi.models.lm import LMGen

    if sampling is None:
        gen = LMGen(official, use_sampling=False)
    else:
        gen = LMGen(official, temp=sampling.temp, temp_text=sampling.temp_text, top_k=sampling.top_k,
                    top_k_text=sampling.top_k_text)
    torch.manual_seed(seed)
    return official_frames(gen, user)


def run_ours(lm, user, sampling: SamplingConfig, seed=0):
    state = G.init_state(lm, user.shape[0], sampling)
    torch.manual_seed(seed)
    frames = []
    for t in range(user.shape[2]):
        out = G.step(lm, state, user[:, :, t])
        if out.valid.all():
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1))
        else:
            assert not out.valid.any()
    return torch.stack(frames, dim=-1)


@pytest.mark.parametrize("name", ["tiny_7b", "tiny_2b_like", "tiny_stt"])
def test_greedy_generation_matches_official(name):
    """Batch 2, 60 steps: three times the context window, so the window slides."""
    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=3)
    ours = ours_from_official(official, kw)
    cfg = ours.cfg
    user = torch.randint(0, cfg.card, (2, cfg.num_user_codebooks, 60), generator=torch.Generator().manual_seed(4))
    ref = run_official(official, user, None)
    out = run_ours(ours, user, SamplingConfig.greedy())
    assert ref.shape == out.shape == (2, 1 + cfg.dep_q, 60 - cfg.max_delay)
    assert torch.equal(ref, out)
    assert len(out[:, 0].unique()) > 3, "degenerate test: text tokens are not varied"


def test_sampled_generation_matches_official_with_same_seed():
    kw = CONFIGS["tiny_7b"]
    official = make_official_lm(kw, seed=5)
    ours = ours_from_official(official, kw)
    user = torch.randint(0, 64, (2, 8, 40), generator=torch.Generator().manual_seed(6))
    sampling = SamplingConfig(temp=0.8, temp_text=0.7, top_k=20, top_k_text=10)
    assert torch.equal(run_official(official, user, sampling, seed=7), run_ours(ours, user, sampling, seed=7))
