import json
from pathlib import Path

import pytest

from openmoshi.lm.config import MOSHI_7B, ConfigError, load_model_config, lm_config_from_dict, parse_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_configs"


def test_7b_config_from_official_json():
    path = CONFIGS / "moshi_7b_202409.json"
    if not path.exists():
        pytest.skip("official configs not found")
    cfg = load_model_config(path)
    assert cfg.lm == MOSHI_7B
    t, d = cfg.lm.temporal, cfg.lm.depth
    assert (t.d_model, t.num_layers, t.num_heads, t.context, t.norm, t.gating) == (4096, 32, 32, 3000, "rms_norm_f32", "silu")
    assert t.dim_feedforward == 16896
    assert (d.d_model, d.num_layers, d.num_heads, d.dim_feedforward, d.weights_per_step, d.context) == (1024, 6, 16, 4224, 8, None)
    assert d.positional_embedding == "none"
    assert cfg.lm.max_delay == 1 and cfg.lm.num_user_codebooks == 8 and cfg.mimi_codebooks == 8


def test_dev_2b_config_keeps_conditioners():
    path = CONFIGS / "moshi_dev_2b.json"
    if not path.exists():
        pytest.skip("official configs not found")
    cfg = load_model_config(path)
    assert cfg.lm.n_q == 32 and cfg.lm.dep_q == 16 and cfg.lm.max_delay == 2
    (desc,) = cfg.lm.conditioners
    assert (desc.name, desc.type, desc.n_bins, desc.dim) == ("description", "lut", 31, 16)
    assert desc.possible_values == ("very_bad", "bad", "neutral", "good", "very_good")
    assert cfg.lm.fuser.sum == ("description",) and not cfg.lm.fuser.cross
    assert cfg.mimi_codebooks == 16


def test_stt_config_runs_without_depth():
    raw = {"model_type": "stt", "stt_config": {"audio_delay_seconds": 0.5}, "dim": 64, "num_heads": 4,
           "num_layers": 2, "n_q": 32, "dep_q": 0, "card": 2048, "text_card": 8000,
           "delays": [0] * 33, "lm_gen_config": {"temp": 0.0, "temp_text": 0.0}}
    cfg = parse_model_config(raw)
    assert cfg.model_type == "stt" and cfg.lm.dep_q == 0 and cfg.mimi_codebooks == 32
    assert cfg.stt_config["audio_delay_seconds"] == 0.5


def test_excerpt_stt_configs_give_clear_errors():
    """The stored STT configs are excerpts: one lacks the model sizes, one is not valid JSON."""
    if not CONFIGS.exists():
        pytest.skip("official configs not found")
    with pytest.raises(ConfigError, match="stt_2.6b_en.json: missing required LM config key 'num_layers'"):
        load_model_config(CONFIGS / "stt_2.6b_en.json")
    with pytest.raises(ConfigError, match=r"not valid JSON: .* line \d+ column \d+"):
        load_model_config(CONFIGS / "stt_1b_enfr.json")


@pytest.mark.parametrize("raw, match", [
    ({"dim": 64, "num_layers": 1, "nonsense": 1}, "unknown LM config key 'nonsense'"),
    ({"dim": 64}, "missing required LM config key 'num_layers'"),
    ({"dim": 64, "num_layers": 1, "n_q": 2, "delays": [0, 0, 0, 0]}, "delays has 4 entries"),
    ({"dim": 64, "num_layers": 1, "n_q": 2, "dep_q": 3, "delays": [0, 0, 0]}, "dep_q=3"),
    ({"dim": 60, "num_layers": 1, "num_heads": 8, "delays": [0] * 9}, "not a multiple of num_heads"),
    ({"dim": 64, "num_layers": 1, "norm": "batch", "delays": [0] * 9}, "unknown norm"),
    ({"dim": "64", "num_layers": 1}, "'dim' must be a non-negative integer"),
    ({"dim": 64, "num_layers": 1, "delays": [0] * 9, "model_type": "x"}, "unknown model_type"),
])
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_config(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_config(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_model_config(tmp_path / "list.json")


def test_round_trip_to_dict():
    assert lm_config_from_dict(MOSHI_7B.to_dict()) == MOSHI_7B
    base = {k: v for k, v in MOSHI_7B.to_dict().items() if k != "depformer_layer_scale"}
    base["layer_scale"] = 0.1
    for depth_scale, expected in (({}, 0.1), ({"depformer_layer_scale": None}, None),
                                  ({"depformer_layer_scale": 0.2}, 0.2)):
        cfg = lm_config_from_dict({**base, **depth_scale})
        assert cfg.depth.layer_scale == expected  # absent: the main one, as the official code
        assert ("depformer_layer_scale" in cfg.to_dict()) == bool(depth_scale)
        assert lm_config_from_dict(cfg.to_dict()) == cfg
