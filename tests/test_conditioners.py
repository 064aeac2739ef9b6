"""LM conditioning (the 2B dev model's `description` LUT, summed into the input): parity with the
official moshi 0.2.13 on random weights, strict loading, config errors."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from openmoshi.lm import generate as G
from openmoshi.loading.lm import load_lm
from openmoshi.lm.conditioners import hash_value
from openmoshi.lm.config import ConfigError, lm_config_from_dict, load_model_config
from openmoshi.lm.model import LMModel
from openmoshi.lm.sampling import SamplingConfig

from lm_utils import TINY_2B_LIKE, make_official_lm, official_frames, ours_from_official

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_configs"
VALUES = ["very_bad", "bad", "neutral", "good", "very_good"]
CONDITIONERS = {"description": {"type": "lut", "lut": {"n_bins": 31, "dim": 16, "tokenizer": "noop",
                                                       "possible_values": VALUES}}}
# The 2B dev model's structure (delay 2, multi-linear depformer, LUT description summed in) at tiny width.
TINY_DEV = {**TINY_2B_LIKE, "depformer_multi_linear": True, "conditioners": CONDITIONERS,
            "fuser": {"sum": ["description"]}}


def official_conditions(official, values):
    from moshi.conditioners import ConditionAttributes

    return official.condition_provider.prepare_and_provide(
        [ConditionAttributes(text={"description": v}) for v in values])


def rel(a, b):
    ok = ~torch.isnan(b)
    return ((a[ok] - b[ok]).abs().max() / b[ok].abs().max()).item()


@pytest.fixture(scope="module")
def models():
    official = make_official_lm(TINY_DEV, seed=1)
    return official, ours_from_official(official, TINY_DEV)


def test_keys_match_official(models):
    official, ours = models
    keys = {k for k in official.state_dict() if k.startswith("condition_provider.")}
    assert keys == {"condition_provider.conditioners.description.embed.weight",
                    "condition_provider.conditioners.description.output_proj.weight",
                    "condition_provider.conditioners.description.learnt_padding"}
    assert keys <= set(ours.state_dict())


@pytest.mark.parametrize("values", [["very_good", "bad"], ["neutral", None]])
def test_condition_sum_matches_official(models, values):
    official, ours = models
    ref = official.fuser.get_sum(official_conditions(official, values))
    with torch.no_grad():
        out = ours.condition_sum([{"description": v} for v in values])
    assert out.shape == (2, 1, ours.cfg.dim) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_training_logits_match_official(models):
    official, ours = models
    values = ["very_good", "very_bad"]
    K = ours.cfg.num_codebooks
    torch.manual_seed(2)
    codes = torch.randint(0, ours.cfg.card, (2, K, 24))
    codes[:, 0] = torch.randint(0, ours.cfg.text_card, (2, 24))
    with torch.no_grad():
        ref = official(codes, condition_tensors=official_conditions(official, values))
        out = ours(codes, condition_sum=ours.condition_sum([{"description": v} for v in values]))
        plain = ours(codes)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.text_mask, ref.text_mask)
    assert rel(out.logits, ref.logits) < 1e-5
    assert rel(out.text_logits, ref.text_logits) < 1e-5
    assert rel(plain.text_logits, ref.text_logits) > 1e-2, "degenerate test: the condition changes nothing"


def run_official(official, values, user):
    from moshi.models.lm import LMGen

    gen = LMGen(official, use_sampling=False, condition_tensors=official_conditions(official, values))
    return official_frames(gen, user)


def run_ours(lm, values, user):
    state = G.init_state(lm, user.shape[0], SamplingConfig.greedy())
    G.set_condition(state, lm.condition_sum([{"description": v} for v in values]))
    frames = []
    for t in range(user.shape[2]):
        out = G.step(lm, state, user[:, :, t])
        if out.valid.all():
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1))
    return torch.stack(frames, dim=-1)


def test_greedy_generation_matches_official(models):
    """Batch 2 with two different condition values, 40 steps (past the context window of 12)."""
    official, ours = models
    cfg = ours.cfg
    user = torch.randint(0, cfg.card, (2, cfg.num_user_codebooks, 40), generator=torch.Generator().manual_seed(4))
    values = ["very_good", "bad"]
    ref = run_official(official, values, user)
    out = run_ours(ours, values, user)
    assert ref.shape == out.shape == (2, 1 + cfg.dep_q, 40 - cfg.max_delay)
    assert torch.equal(ref, out)
    swapped = run_ours(ours, values[::-1], user)
    assert not torch.equal(swapped, out), "degenerate test: the condition changes nothing"


def test_set_condition_per_slot(models):
    _, ours = models
    state = G.init_state(ours, 3)
    assert state.guidance.condition.shape == (3, 1, ours.cfg.dim) and not state.guidance.condition.any()
    cond = ours.condition_sum([{"description": "good"}])
    G.set_condition(state, cond, mask=torch.tensor([False, True, False]))
    assert not state.guidance.condition[0].any() and not state.guidance.condition[2].any()
    assert torch.equal(state.guidance.condition[1], cond[0])
    with pytest.raises(ValueError, match="condition must be"):
        G.set_condition(state, torch.zeros(2, 1, ours.cfg.dim))


def test_strict_load_keeps_conditioners_in_float32(models, tmp_path):
    official, ours = models
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(path))
    cfg = lm_config_from_dict(TINY_DEV)
    lm = load_lm(path, cfg, dtype=torch.bfloat16)
    assert lm.condition_provider.conditioners["description"].embed.weight.dtype == torch.float32
    assert lm.text_emb.weight.dtype == torch.bfloat16
    values = [{"description": "very_good"}, {"description": None}]
    with torch.no_grad():
        assert torch.equal(lm.condition_sum(values), ours.condition_sum(values))
    state = G.init_state(lm, 2)
    G.set_condition(state, lm.condition_sum(values))
    assert state.guidance.condition.dtype == torch.bfloat16
    G.step(lm, state, torch.zeros(2, cfg.num_user_codebooks, dtype=torch.long))
    assert load_lm(None, cfg, dtype=torch.bfloat16).condition_provider.conditioners["description"] \
        .learnt_padding.dtype == torch.float32


def test_bad_attributes(models):
    _, ours = models
    with pytest.raises(ValueError, match="'excellent' is not a possible value of condition 'description'"):
        ours.condition_sum([{"description": "excellent"}])
    with pytest.raises(ValueError, match="no value for condition 'description'"):
        ours.condition_sum([{}])
    with pytest.raises(ValueError, match="unknown condition 'genre'"):
        ours.condition_sum([{"description": "good", "genre": "rock"}])


def test_hash_trick_without_possible_values():
    """Without possible_values any string gets a stable row, the official way."""
    from moshi.conditioners.text import hash_trick

    lut = {"description": {"type": "lut", "lut": {"n_bins": 7, "dim": 4, "tokenizer": "noop"}}}
    kw = {**TINY_DEV, "conditioners": lut}
    official = make_official_lm(kw, seed=3)
    ours = ours_from_official(official, kw)
    values = ["anything", "at all"]
    assert [hash_value(v, 7) for v in values] == [hash_trick(v, 7) for v in values]
    with torch.no_grad():
        assert torch.equal(ours.condition_sum([{"description": v} for v in values]),
                           official.fuser.get_sum(official_conditions(official, values)))


def test_tensor_conditioner():
    kw = {**TINY_DEV, "conditioners": {"speaker": {"type": "tensor", "tensor": {"dim": 5}}},
          "fuser": {"sum": ["speaker"]}}
    lm = LMModel(lm_config_from_dict(kw))
    conditioner = lm.condition_provider.conditioners["speaker"]
    vec = torch.randn(5)
    with torch.no_grad():
        out = lm.condition_sum([{"speaker": vec}, {"speaker": None}])
        assert torch.allclose(out[0, 0], conditioner.output_proj(vec))
        assert torch.equal(out[1], conditioner.learnt_padding[0])


@pytest.mark.parametrize("change, message", [
    ({"conditioners": {"d": {"type": "t5", "t5": {}}}, "fuser": None}, "unknown conditioner type 't5'"),
    ({"fuser": {"concat": ["description"]}}, "unknown fuse method or fuser option 'concat'"),
    ({"fuser": {"prepend": ["description"]}}, "'prepend' is not supported"),
    ({"fuser": {"sum": ["genre"]}}, "fuser.sum names condition 'genre'"),
    ({"conditioners": {"d": {"type": "lut", "lut": {"n_bins": 4, "dim": 4, "tokenizer": "spm"}}}, "fuser": None},
     "unknown tokenizer 'spm'"),
    ({"conditioners": {"d": {"type": "lut", "lut": {"n_bins": 4, "dim": 4, "tokenizer": "noop", "size": 3}}},
      "fuser": None}, "conditioners.d.lut: unknown key 'size'"),
    ({"conditioners": {"d": {"type": "lut", "lut": {"n_bins": 2, "dim": 4, "tokenizer": "noop",
                                                     "possible_values": VALUES}}}, "fuser": None},
     "5 possible_values do not fit n_bins=2"),
])
def test_config_errors(change, message):
    kw = {k: v for k, v in {**TINY_DEV, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        lm_config_from_dict(kw)


@pytest.mark.parametrize("change, message", [
    ({"fuser": {"cross": ["description"]}}, "needs cross_attention=true"),
    ({"cross_attention": True}, "needs conditions fused by cross-attention"),
    ({"cross_attention": True, "fuser": {"cross": ["description"]}, "kv_repeat": 2}, "kv_repeat = 1"),
])
def test_cross_attention_config_errors(change, message):
    """Cross-attention (Kyutai TTS) and the fuser's "cross" conditions go together (tested in
    test_tts.py); a config with one and not the other says which key is missing."""
    with pytest.raises(ConfigError, match=message):
        lm_config_from_dict({**TINY_DEV, **change})


def test_config_round_trip():
    cfg = lm_config_from_dict(TINY_DEV)
    assert cfg.conditioners[0].possible_values == tuple(VALUES) and cfg.fuser.sum == ("description",)
    assert lm_config_from_dict(cfg.to_dict()) == cfg


def test_dev_2b_config_builds_on_meta():
    path = CONFIGS / "moshi_dev_2b.json"
    if not path.exists():
        pytest.skip("official configs not found")
    cfg = load_model_config(path)
    with torch.device("meta"):
        lm = LMModel(cfg.lm)
    assert lm.condition_provider.conditioners["description"].embed.weight.shape == (32, 16)
    assert lm.condition_provider.conditioners["description"].output_proj.weight.shape == (2560, 16)
    assert lm.condition_provider.conditioners["description"].learnt_padding.shape == (1, 1, 2560)


@pytest.mark.parametrize("coef", [3.0, 0.5])
def test_classifier_free_guidance_matches_official(models, coef):
    """cfg_coef != 1, as Hibiki's --cfg-coef: 2B rows (the slots' condition, then the negative one),
    guided logits null + (cond - null) * coef. Greedy and seeded sampling, 30 steps."""
    from moshi.models.lm import LMGen

    official, ours = models
    cfg = ours.cfg
    B = 2
    user = torch.randint(0, cfg.card, (B, cfg.num_user_codebooks, 30), generator=torch.Generator().manual_seed(5))
    good, bad = ["very_good", "good"], ["very_bad", "very_bad"]
    for sampling in (SamplingConfig.greedy(), SamplingConfig(temp=0.8, top_k=20, temp_text=0.7, top_k_text=10)):
        use_sampling = sampling.temp > 0
        kw = dict(temp=sampling.temp, top_k=sampling.top_k, temp_text=sampling.temp_text,
                  top_k_text=sampling.top_k_text) if use_sampling else {}
        torch.manual_seed(7)
        gen = LMGen(official, use_sampling=use_sampling, cfg_coef=coef,
                    condition_tensors=official_conditions(official, good + bad), **kw)
        ref = official_frames(gen, user)
        torch.manual_seed(7)
        state = G.init_state(ours, B, sampling, cfg_coef=coef)
        G.set_condition(state, ours.condition_sum([{"description": v} for v in good]),
                        negative=ours.condition_sum([{"description": v} for v in bad]))
        frames = []
        for t in range(user.shape[2]):
            out = G.step(ours, state, user[:, :, t])
            if out.valid.all():
                frames.append(torch.cat([out.text[:, None], out.audio], dim=1))
        out = torch.stack(frames, dim=-1)
        assert torch.equal(ref, out), sampling
        if not use_sampling:
            assert not torch.equal(run_ours(ours, good, user), out), "degenerate test: guidance changes nothing"


def test_classifier_free_guidance_errors(models):
    official, ours = models
    state = G.init_state(ours, 2, cfg_coef=2.0)
    cond = ours.condition_sum([{"description": "good"}])
    with pytest.raises(ValueError, match="needs a negative condition"):
        G.set_condition(state, cond)
    plain = G.init_state(ours, 2)
    with pytest.raises(ValueError, match="for classifier-free guidance"):
        G.set_condition(plain, cond, negative=cond)
    from lm_utils import TINY_7B

    with pytest.raises(ValueError, match="needs a conditioned model"):
        G.init_state(LMModel(lm_config_from_dict(TINY_7B)), 1, cfg_coef=3.0)


def test_guided_step_through_the_graph_wrapper_equals_eager(models):
    """The CUDA-graph discipline (on CPU: static buffers, eagerly) with guidance and idle slots."""
    from openmoshi.accel.cuda_graph import GraphedStep

    _, ours = models
    cfg = ours.cfg
    states = []
    for _ in range(2):
        s = G.init_state(ours, 3, SamplingConfig.greedy(), cfg_coef=2.0)
        G.set_condition(s, ours.condition_sum([{"description": v} for v in ("good", "bad", "very_good")]),
                        negative=ours.condition_sum([{"description": "very_bad"}]))
        states.append(s)
    wrapped = GraphedStep(ours, states[1], cuda_graph=True)
    g = torch.Generator().manual_seed(3)
    active = torch.tensor([True, False, True])
    for t in range(12):
        codes = torch.randint(0, cfg.card, (3, cfg.num_user_codebooks), generator=g)
        a = active if t % 4 == 3 else None
        ref = G.step(ours, states[0], codes, active=a, check=False, attend=G.read_window(t, states[0]))
        out = wrapped(codes, a)
        assert torch.equal(ref.text, out.text) and torch.equal(ref.audio, out.audio)
        assert torch.equal(ref.valid, out.valid)
