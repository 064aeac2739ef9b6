"""The released int8 checkpoint (`model.q8.safetensors`, bitsandbytes row-wise int8) loads straight
into 8-bit weights, in both key namings, and generates what the official model generates with the
same weights. (The official package loads q8 only through bitsandbytes on CUDA.)

The oracle owes nothing to our q8 code: the file is laid out by the official package itself (its
`replace_linear_with_qlinear` picks the layers and names the keys, with bitsandbytes' row-wise
quantizer restated below), the released stacked naming is the one its load hook reads, and the
official model gets its weights from the file dequantized here, in the released convention."""

from __future__ import annotations

import copy
import re
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lm_utils import CONFIGS, make_official_lm
from openmoshi.accel.quantize import QuantizedLinear
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.files import CheckpointError
from openmoshi.loading.lm import load_lm
from test_lm_parity import run_official, run_ours


def _int8_vectorwise_quant(a: torch.Tensor, threshold: float = 0.0):
    """bitsandbytes' `functional.int8_vectorwise_quant`, which the official QLinear calls on the
    fp16 weight: per row, absmax as float32 (SCB) and round(a * 127 / absmax) as int8 (CB)."""
    scb = a.float().abs().amax(dim=1)
    return torch.round(a.float() * (127.0 / scb[:, None])).to(torch.int8), scb, None


def official_q8_state(official, monkeypatch) -> dict[str, torch.Tensor]:
    """The state dict of the official model quantized the official way (`quantize=True` in its
    LMModel): every nn.Linear becomes a QLinear holding `weight` int8 and `weight_scb`. Per-set
    attention keys (`in_projs.{i}.weight`), as the official 0.2.13 modules name them."""
    from moshi.utils.quantize import replace_linear_with_qlinear

    bnb = types.ModuleType("bitsandbytes")
    bnb.functional = types.SimpleNamespace(int8_vectorwise_quant=_int8_vectorwise_quant)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    quantized = copy.deepcopy(official)
    replace_linear_with_qlinear(quantized)
    return {k: v.detach().clone() for k, v in quantized.state_dict().items()}


def released_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kyutai's files stack each attention's weight sets (and their scales) on the first axis:
    `X.in_proj_weight[_scb]` and `X.out_proj.weight[_scb]`, the names the official load hook
    splits back into `X.in_projs.{i}.weight[_scb]`."""
    out, stacked = {}, {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.(in|out)_projs\.(\d+)\.weight(_scb)?$", key)
        if m is None:
            out[key] = value
            continue
        prefix, kind, i, scb = m.group(1), m.group(2), int(m.group(3)), m.group(4) or ""
        name = f"{prefix}.in_proj_weight{scb}" if kind == "in" else f"{prefix}.out_proj.weight{scb}"
        stacked.setdefault(name, {})[i] = value
    for name, sets in stacked.items():
        out[name] = torch.cat([sets[i] for i in range(len(sets))])
    return out


def dequantized(file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released convention, W = q * scb / 127 row by row, on the file's own tensors."""
    out = dict(file)
    for key in [k for k in file if k.endswith("_scb")]:
        name = key[: -len("_scb")]
        out[name] = file[name].float() * file[key].float()[:, None] / 127
        del out[key]
    return out


def write_q8(official, released: bool, path, monkeypatch) -> dict[str, torch.Tensor]:
    state = official_q8_state(official, monkeypatch)
    state = released_naming(state) if released else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("released", [True, False], ids=["released-naming", "per-set-naming"])
@pytest.mark.parametrize("name", ["tiny_7b", "tiny_2b_like", "golden"])
def test_q8_loads_in_8_bits_and_generates_as_the_official_model(tmp_path, monkeypatch, name, released):
    """Greedy generation (for golden, whose random weights generate one token: the training
    forward's logits, which also cover its low-rank embeddings' linears)."""
    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=3)
    path = tmp_path / "model.q8.safetensors"
    file = write_q8(official, released, path, monkeypatch)
    assert any(k.endswith(".in_proj_weight_scb") for k in file) == released
    assert any(k.endswith(".in_projs.0.weight_scb") for k in file) != released

    # The file holds the float weights it was made from, to int8 rounding: |W - q scb/127| <= scb/254.
    floats = {k: v.half().float() for k, v in official.state_dict().items()}  # QLinear quantizes fp16
    floats = released_naming(floats) if released else floats
    weights = dequantized(file)
    for key in [k[: -len("_scb")] for k in file if k.endswith("_scb")]:
        assert file[key].dtype == torch.int8 and file[key + "_scb"].dtype == torch.float32, key
        assert (file[key].abs().amax(dim=1) == 127).all(), key  # scb is each row's absmax
        bound = file[key + "_scb"][:, None] / 254 * (1 + 1e-5)
        assert ((weights[key] - floats[key]).abs() <= bound).all(), key

    ours = load_lm(path, lm_config_from_dict(kw), dtype=torch.float32)
    quantized = [m for m in ours.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32 for m in quantized)
    assert not any(isinstance(m, nn.Linear) for m in ours.modules())  # every linear stays in 8 bits

    official.load_state_dict(weights)  # strict; the official load hook splits the released stacks
    if name == "golden":
        codes = torch.randint(0, kw["card"], (2, ours.cfg.num_codebooks, 12), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            ref, out = official(codes), ours(codes)
        assert torch.equal(ref.mask, out.mask)
        torch.testing.assert_close(out.logits[out.mask], ref.logits[ref.mask], rtol=1e-5, atol=1e-5)
        return
    user = torch.randint(0, kw["card"], (2, ours.cfg.num_user_codebooks, 30), generator=torch.Generator().manual_seed(4))
    ref = run_official(official, user, None)
    out = run_ours(ours, user, SamplingConfig.greedy())
    assert torch.equal(ref, out)
    assert len(out.unique()) > 5  # not a degenerate comparison


def test_q8_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    kw = CONFIGS["tiny_7b"]
    path = tmp_path / "model.q8.safetensors"
    write_q8(make_official_lm(kw), True, path, monkeypatch)
    cfg = lm_config_from_dict(kw)
    with pytest.raises(CheckpointError, match="q8.*--quantize int4"):
        load_lm(path, cfg, dtype=torch.float32, quantize="int4")
    with pytest.raises(CheckpointError, match="LoRA adapter cannot be merged"):
        load_lm(path, cfg, dtype=torch.float32, lora=tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="right file for this model"):
        load_lm(path, lm_config_from_dict({**kw, "num_layers": 1}), dtype=torch.float32)
