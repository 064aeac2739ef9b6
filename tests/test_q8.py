"""The released int8 checkpoint (`model.q8.safetensors`, bitsandbytes row-wise int8) loads straight
into 8-bit weights, in both key namings, and generates what the official model generates with the
same (dequantized) weights. (The official package loads q8 only through bitsandbytes on CUDA.)"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lm_utils import CONFIGS, make_official_lm
from openmoshi.accel.quantize import QuantizedLinear
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.files import CheckpointError
from openmoshi.loading.formats.q8 import dequantize_q8
from openmoshi.loading.lm import load_lm
from test_lm_parity import run_official, run_ours


def q8_state(official, released: bool) -> dict[str, torch.Tensor]:
    """Every nn.Linear's weight as bitsandbytes stores it: int8 and its row absmax (`_scb`). With
    `released`, attention projections stacked over their sets (`in_proj_weight`, as Kyutai's files)."""
    linears = {f"{n}.weight" for n, m in official.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for key, value in official.state_dict().items():
        if key in linears:
            scb = value.abs().amax(dim=1).float()
            out[key] = torch.round(value / scb[:, None] * 127).to(torch.int8)
            out[key + "_scb"] = scb
        else:
            out[key] = value
    if not released:
        return out
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for key in list(out):
        m = re.match(r"^(.*)\.(in|out)_projs\.(\d+)\.weight(_scb)?$", key)
        if m:
            name = f"{m.group(1)}.{m.group(2)}_proj" + ("_weight" if m.group(2) == "in" else ".weight") + (m.group(4) or "")
            stacked.setdefault(name, {})[int(m.group(3))] = out.pop(key)
    out.update({k: torch.cat([v[i] for i in range(len(v))]) for k, v in stacked.items()})
    return out


@pytest.mark.parametrize("released", [True, False], ids=["released-naming", "per-set-naming"])
@pytest.mark.parametrize("name", ["tiny_7b", "tiny_2b_like", "golden"])
def test_q8_loads_in_8_bits_and_generates_as_the_official_model(tmp_path, name, released):
    """Greedy generation (for golden, whose random weights generate one token: the training
    forward's logits, which also cover its low-rank embeddings' linears)."""
    kw = CONFIGS[name]
    official = make_official_lm(kw, seed=3)
    q8 = q8_state(official, released)
    assert any(k.endswith("in_proj_weight_scb") for k in q8) == released
    path = tmp_path / "model.q8.safetensors"
    save_file({k: v.contiguous() for k, v in q8.items()}, str(path))

    ours = load_lm(path, lm_config_from_dict(kw), dtype=torch.float32)
    quantized = [m for m in ours.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32 for m in quantized)
    assert not any(isinstance(m, nn.Linear) for m in ours.modules())  # every linear stays in 8 bits

    per_set = q8_state(official, released=False)
    official.load_state_dict(dequantize_q8(per_set, torch.float32))  # the same weights, as floats
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


def test_q8_refuses_what_it_cannot_do(tmp_path):
    kw = CONFIGS["tiny_7b"]
    path = tmp_path / "model.q8.safetensors"
    save_file({k: v.contiguous() for k, v in q8_state(make_official_lm(kw), True).items()}, str(path))
    cfg = lm_config_from_dict(kw)
    with pytest.raises(CheckpointError, match="q8.*--quantize int4"):
        load_lm(path, cfg, dtype=torch.float32, quantize="int4")
    with pytest.raises(CheckpointError, match="LoRA adapter cannot be merged"):
        load_lm(path, cfg, dtype=torch.float32, lora=tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="right file for this model"):
        load_lm(path, lm_config_from_dict({**kw, "num_layers": 1}), dtype=torch.float32)
