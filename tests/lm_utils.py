"""Helpers for LM tests: tiny official configs and official models with random weights."""

from __future__ import annotations

import torch

from openmoshi.loading.files import canonical_keys, load_state_strict
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.model import LMModel

# The released 7B's structure (gated SiLU, RMSNorm f32, RoPE, multi-linear depformer with weights
# per step, no depformer positions, acoustic delay 1) at tiny width, with a short context window.
TINY_7B = dict(
    dim=64, text_card=100, existing_text_padding_id=3, n_q=16, dep_q=8, card=64, num_heads=4,
    num_layers=2, hidden_scale=4.125, causal=True, layer_scale=None, context=20, max_period=10000,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=32,
    depformer_dim_feedforward=132, depformer_num_heads=2, depformer_num_layers=2,
    depformer_layer_scale=None, depformer_multi_linear=True, depformer_context=8,
    depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
    depformer_weights_per_step=True, delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])

# The golden assets' config: sin positions, LayerNorm, plain GELU FFN in the temporal transformer,
# schedule-shared depth weights, low-rank embeddings, uneven delays.
GOLDEN = dict(
    delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1,
    hidden_scale=1, depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8,
    depformer_num_heads=1, depformer_gating="silu", context=4)

# Delay 2 like the 2B models, grouped-query attention, layer scale, single depformer input.
TINY_2B_LIKE = dict(
    dim=48, text_card=80, n_q=8, dep_q=4, card=40, num_heads=4, kv_repeat=2, num_layers=2,
    hidden_scale=4.125, layer_scale=0.1, context=12, max_period=100000, gating="silu",
    norm="rms_norm_f32", positional_embedding="rope", depformer_dim=32, depformer_num_heads=2,
    depformer_num_layers=1, depformer_gating="silu", depformer_pos_emb="none",
    depformer_weights_per_step=True, depformer_multi_linear=False, delays=[0, 0, 2, 2, 2, 0, 2, 2, 2])

# Speech-to-text: no depth transformer, all streams undelayed except text.
TINY_STT = dict(
    dim=32, text_card=60, n_q=4, dep_q=0, card=40, num_heads=2, num_layers=2, hidden_scale=4.125,
    context=16, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
    delays=[0, 0, 0, 0, 0])

CONFIGS = {"tiny_7b": TINY_7B, "golden": GOLDEN, "tiny_2b_like": TINY_2B_LIKE, "tiny_stt": TINY_STT,
           # an explicit null depformer_layer_scale: no layer scale in the depth transformer (absent: the main one)
           "tiny_2b_dep_no_scale": {**TINY_2B_LIKE, "depformer_layer_scale": None}}


def make_official_lm(kwargs: dict, seed: int = 0, std: float = 0.2):
    """The official LMModel with random weights (scaled up so logits are far from ties); with
    `conditioners`/`fuser` keys, its conditioners are built as the official loader builds them."""
    import copy

    from moshi.models import loaders
    from moshi.models.lm import LMModel as OfficialLM

    kwargs = copy.deepcopy(kwargs)
    torch.manual_seed(seed)
    extra = {}
    if "conditioners" in kwargs:
        extra["condition_provider"] = loaders.get_conditioner_provider(kwargs["dim"], "cpu", kwargs)
        extra["fuser"] = loaders.get_condition_fuser(kwargs)
        del kwargs["conditioners"], kwargs["fuser"]
    model = OfficialLM(**extra, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if name.startswith("condition_provider.") else std)
    return model


def ours_from_official(official, kwargs: dict, dtype=torch.float32) -> LMModel:
    with torch.device("meta"):
        model = LMModel(lm_config_from_dict(kwargs))
    load_state_strict(model, canonical_keys(dict(official.state_dict())), "official", dtype)
    return model.eval()


def official_frames(gen, user: torch.Tensor) -> torch.Tensor:
    """Runs an official LMGen over user codes [B, Ku, T]; the frames it returns, [B, 1 + dep_q, T']."""
    frames = []
    with gen.streaming(user.shape[0]):
        for t in range(user.shape[2]):
            out = gen.step(user[:, :, t:t + 1])
            if out is not None:
                frames.append(out[:, :, 0])
    return torch.stack(frames, dim=-1)


def tiny_lm(seed: int = 0, std: float = 0.2) -> LMModel:
    """Our tiny 7B-shaped LM with random weights (scaled so logits are far from ties), in eval mode."""
    torch.manual_seed(seed)
    m = LMModel(lm_config_from_dict(TINY_7B)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m
