"""Loading official LM checkpoints: dtypes, naming variants, LoRA, and every error path."""

import pytest
import torch
from safetensors.torch import save_file

from openmoshi.loading.files import CheckpointError, read_safetensors
from openmoshi.loading.lora import apply_lora
from openmoshi.loading.lm import load_lm
from openmoshi.loading.tokenizer import load_text_tokenizer
from openmoshi.lm.config import lm_config_from_dict

from lm_utils import TINY_7B, make_official_lm

CFG = lm_config_from_dict(TINY_7B)


@pytest.fixture(scope="module")
def official():
    return make_official_lm(TINY_7B, seed=11)


@pytest.fixture(scope="module")
def codes():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 64, (1, 17, 12), generator=g)
    c[:, 0] = torch.randint(0, 100, (1, 12), generator=g)
    return c


def released_naming(sd):
    """The released files stack the per-step attention weights into one tensor."""
    out, stacks = {}, {}
    for k, v in sd.items():
        for kind, name in (("in_projs", "in_proj_weight"), ("out_projs", "out_proj.weight")):
            if f".{kind}." in k:
                prefix, idx = k.split(f".{kind}.")
                stacks.setdefault(f"{prefix}.{name}", {})[int(idx.split(".")[0])] = v
                break
        else:
            out[k] = v
    for k, parts in stacks.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)])
    return out


@pytest.fixture(scope="module")
def lm_file(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in released_naming(official.state_dict()).items()}, str(path))
    return path


@pytest.mark.parametrize("naming", ["released", "official_state_dict"])
def test_both_namings_load_and_match(official, codes, naming, tmp_path):
    sd = {k: v.contiguous() for k, v in official.state_dict().items()}
    if naming == "released":
        sd = released_naming(sd)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    lm = load_lm(path, CFG, dtype=torch.float32)
    with torch.no_grad():
        ref, out = official(codes), lm(codes)
    ok = out.mask
    torch.testing.assert_close(out.logits[ok], ref.logits[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes(lm_file, dtype, codes):
    lm = load_lm(lm_file, CFG, dtype=dtype)
    assert {p.dtype for p in lm.parameters()} == {dtype}
    assert not any(p.is_meta for p in lm.parameters())
    with torch.no_grad():
        out = lm(codes)
    assert torch.isfinite(out.logits[out.mask]).all()


def test_wrong_key(lm_file, tmp_path):
    sd = read_safetensors(lm_file)
    sd["transformer.layers.0.bogus"] = sd.pop("transformer.layers.0.norm1.alpha")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad.safetensors: missing key 'transformer.layers.0.norm1.alpha'"):
        load_lm(tmp_path / "bad.safetensors", CFG)
    sd["transformer.layers.0.norm1.alpha"] = sd["transformer.layers.0.norm2.alpha"].clone()
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer.layers.0.bogus'"):
        load_lm(tmp_path / "extra.safetensors", CFG)


def test_wrong_shape_names_key(lm_file):
    cfg = lm_config_from_dict({**TINY_7B, "card": 80})
    with pytest.raises(CheckpointError, match=r"key 'emb.0.weight' has shape \(65, 64\), the model expects \(81, 64\)"):
        load_lm(lm_file, cfg)


def test_truncated_missing_and_garbage_files(lm_file, tmp_path):
    data = lm_file.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.safetensors is truncated: tensor '.*'"):
        load_lm(tmp_path / "trunc.safetensors", CFG)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_lm(tmp_path / "tiny.safetensors", CFG)
    (tmp_path / "text.safetensors").write_text("hello, this is not a checkpoint at all" * 3)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_lm(tmp_path / "text.safetensors", CFG)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_lm(tmp_path / "absent.safetensors", CFG)
    with pytest.raises(CheckpointError, match="text tokenizer file not found"):
        load_text_tokenizer(tmp_path / "absent.model")
    with pytest.raises(CheckpointError, match="is not a SentencePiece model"):
        load_text_tokenizer(tmp_path / "text.safetensors")


def test_lora_matches_official_merged_and_apart(official, lm_file, codes, tmp_path):
    import copy

    from moshi.modules.lora import replace_all_linear_with_lora

    lora_model = copy.deepcopy(official).float()
    replace_all_linear_with_lora(lora_model, rank=4, scaling=2.0)
    torch.manual_seed(3)
    lora_sd = {}
    for k, v in lora_model.state_dict().items():
        if ".lora_" in k:
            lora_sd[k] = torch.randn_like(v) * 0.05
    lora_model.load_state_dict(lora_sd, strict=False)
    save_file(lora_sd, str(tmp_path / "lora.safetensors"))
    # Base weights in fp32 so that the comparison measures the adapters, not bf16 rounding.
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(tmp_path / "base.safetensors"))
    with torch.no_grad():
        ref = lora_model(codes)
        for fuse in (True, False):
            lm = load_lm(tmp_path / "base.safetensors", CFG, dtype=torch.float32, lora=tmp_path / "lora.safetensors",
                         fuse_lora=fuse)
            out = lm(codes)
            torch.testing.assert_close(out.logits[out.mask], ref.logits[ref.mask], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.text_logits, ref.text_logits, rtol=1e-4, atol=1e-4, equal_nan=True)
    bad = dict(lora_sd)
    bad["nowhere.lora_A.weight"], bad["nowhere.lora_B.weight"] = torch.zeros(1, 1), torch.zeros(1, 1)
    save_file(bad, str(tmp_path / "bad_lora.safetensors"))
    with pytest.raises(CheckpointError, match="names no linear layer"):
        apply_lora(lm, tmp_path / "bad_lora.safetensors")
