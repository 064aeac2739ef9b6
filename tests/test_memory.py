"""Building and loading an LM costs the final model's memory: no float32 detour, no second full
copy, each layer linear quantized as it is made or read (measured in fresh processes, at the 7B's
widths with a few layers: tests/memory_probe.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent


def probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The wide model's checkpoint as released (bf16, stacked in_proj_weight), and as q8."""
    from memory_probe import WIDE_7B
    from openmoshi.lm.config import lm_config_from_dict
    from openmoshi.loading.files import released_keys
    from openmoshi.loading.lm import load_lm

    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    lm = load_lm(None, lm_config_from_dict(WIDE_7B), "cpu", torch.bfloat16)
    state = released_keys({k: v.contiguous() for k, v in lm.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"))
    q8 = {}
    for key, value in state.items():
        if value.dim() == 2 and ("proj" in key or "linear" in key or "depformer_in" in key or "linears" in key):
            scb = value.float().abs().amax(dim=1)
            q8[key] = torch.round(value.float() / scb[:, None] * 127).to(torch.int8)
            q8[key + "_scb"] = scb
        else:
            q8[key] = value
    del lm, state
    save_file(q8, str(folder / "model.q8.safetensors"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype,quantize", [
    ("random", "bfloat16", "none"), ("random", "bfloat16", "int4"),
    ("load", "bfloat16", "none"), ("load", "bfloat16", "int8"), ("load", "bfloat16", "int4"),
    ("q8", "bfloat16", "none"),
])
def test_peak_memory_is_the_final_model(files, kind, dtype, quantize):
    path = {"load": files / "model.safetensors", "q8": files / "model.q8.safetensors"}.get(kind)
    r = probe("random" if kind == "random" else "load", dtype, quantize, *([str(path)] if path else []))
    # Quantized as they come, at most one linear is ever in float beside the final model.
    allowance = r["largest_linear_float_gb"] if quantize != "none" else 0.0
    assert r["peak_gb"] <= 1.1 * r["final_gb"] + allowance, r
    if kind == "q8":
        assert r["final_gb"] < 0.75 * probe("random", "bfloat16", "none")["final_gb"]  # 8 bits, not bf16
