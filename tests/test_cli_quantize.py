"""`openmoshi quantize`: the file it writes loads everywhere a model is loaded and runs exactly as
quantizing on load (`--quantize`) does; LoRA, config and usage errors are one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infer_utils import MOSHI, NAMES, make_checkpoint
from openmoshi.cli import quantize as cli_quantize
from openmoshi.accel import quantize
from openmoshi.audio import load_audio, save_wav
from openmoshi.cli.main import main
from openmoshi.loading.formats.quantized import quantization_of

# Every input width of the LM's layers a multiple of 128 (int4's default group size): dim 128,
# gated feed-forwards of 512 (temporal) and 256 (depth) hidden units.
WIDE = dict(MOSHI, dim=128, hidden_scale=6, depformer_dim=128, depformer_dim_feedforward=384)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantize") / "moshi"
    make_checkpoint(folder, "moshi", lm_kwargs=WIDE)
    return folder


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "in.wav"
    t = torch.arange(int(0.5 * 24000)) / 24000
    save_wav(path, (0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(len(t)))[None], float32=True)
    return path


@pytest.fixture(scope="module")
def lora(ckpt) -> Path:
    """An adapter in the official key format on two layers (attention and feed-forward)."""
    g = torch.Generator().manual_seed(3)
    d, rank = WIDE["dim"], 4
    state = {}
    for name, out_dim in (("transformer.layers.0.self_attn.in_proj", 3 * d),
                          ("transformer.layers.1.gating.linear_in", 2 * 512)):
        state[f"{name}.lora_A.weight"] = torch.randn(rank, d, generator=g) * 0.2
        state[f"{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.2
    path = ckpt.parent / "adapter.safetensors"
    save_file(state, str(path))
    return path


def _quantize(ckpt: Path, out: Path, *flags: str) -> None:
    assert main(["quantize", "-o", str(out), "--hf-repo", str(ckpt), *flags]) == 0


def _infer(ckpt: Path, wav: Path, out: Path, *flags: str) -> tuple[list[int], bytes]:
    """Seeded sampling on the wav: (text token ids, the output audio's samples as bytes)."""
    transcript = out.with_suffix(".json")
    assert main(["infer", str(wav), "-o", str(out), "--transcript", str(transcript), "--float32", "--seed", "5",
                 "--hf-repo", str(ckpt), "--device", "cpu", "-q", *flags]) == 0
    pcm = load_audio(out)
    assert pcm.shape == (1, 6 * 1920) and pcm.abs().max() > 0
    return [p["id"] for p in json.loads(transcript.read_text())["pieces"]], pcm.numpy().tobytes()


def _fails(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openmoshi: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_file_runs_as_quantize_on_load(mode, ckpt, wav, tmp_path, capsys):
    """infer --moshi-weight q.safetensors == infer --quantize MODE on the float file: same tokens
    and audio (the same weights quantized the same way), and --quantize MODE again changes nothing."""
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", mode)
    out = capsys.readouterr().out
    assert quantization_of(q) == (mode, 128)
    assert q.stat().st_size < (ckpt / NAMES["moshi_name"]).stat().st_size
    assert f"openmoshi serve --hf-repo {ckpt} --moshi-weight {q}" in out and "MB" in out
    assert list(tmp_path.iterdir()) == [q]  # no temporary file left behind

    ref = _infer(ckpt, wav, tmp_path / "ref.wav", "--quantize", mode)
    assert _infer(ckpt, wav, tmp_path / "file.wav", "--moshi-weight", str(q)) == ref
    assert _infer(ckpt, wav, tmp_path / "again.wav", "--moshi-weight", str(q), "--quantize", mode) == ref
    other = "int4" if mode == "int8" else "int8"
    err = _fails(capsys, "infer", str(wav), "-o", str(tmp_path / "x.wav"), "--hf-repo", str(ckpt),
                 "--moshi-weight", str(q), "--quantize", other)
    assert f"already quantized as {mode}, not {other}" in err and f"quantize --mode {other}" in err


def test_speech_to_text_model(wav, tmp_path):
    """A model without a depth transformer (STT): the transcript of the file == of --quantize."""
    ckpt = tmp_path / "stt"
    make_checkpoint(ckpt, "stt")
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", "int8")
    texts = []
    for flags in (["--quantize", "int8"], ["--moshi-weight", str(q)]):
        t = tmp_path / "t.json"
        assert main(["infer", str(wav), "--transcript", str(t), "--hf-repo", str(ckpt), "-q", *flags]) == 0
        texts.append(json.loads(t.read_text())["pieces"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_bfloat16_load_keeps_float32_scales(layer_scale, tmp_path):
    """Loading a quantized file in bfloat16 gives the model quantizing on load does: quantization
    scales in float32, everything else (LayerScale's `scale` too) in bfloat16."""
    from openmoshi.loading.lm import load_lm
    from openmoshi.lm.config import lm_config_from_dict

    kwargs = {k: v for k, v in WIDE.items() if k != "depformer_layer_scale"}  # the depformer's: layer_scale
    kwargs["layer_scale"] = layer_scale
    ckpt = tmp_path / "moshi"
    make_checkpoint(ckpt, "moshi", lm_kwargs=kwargs)
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", "int4", "--dtype", "bfloat16")
    cfg = lm_config_from_dict(kwargs)
    a = load_lm(q, cfg, dtype=torch.bfloat16)
    b = load_lm(ckpt / NAMES["moshi_name"], cfg, dtype=torch.bfloat16, quantize="int4")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (".layer_scale_1.scale" in " ".join(sa)) == (layer_scale is not None)


def test_lora_is_merged_before_quantizing(ckpt, wav, lora, tmp_path, capsys):
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", "int8", "--lora-weight", str(lora))
    assert "merging the LoRA adapter" in capsys.readouterr().err
    ref = _infer(ckpt, wav, tmp_path / "ref.wav", "--lora-weight", str(lora), "--quantize", "int8")
    assert _infer(ckpt, wav, tmp_path / "file.wav", "--moshi-weight", str(q)) == ref
    # The same adapter named again (as a repo whose config names it does) is already in the weights.
    assert _infer(ckpt, wav, tmp_path / "again.wav", "--moshi-weight", str(q), "--lora-weight", str(lora)) == ref
    assert _infer(ckpt, wav, tmp_path / "plain.wav", "--quantize", "int8")[1] != ref[1]  # the adapter mattered

    other = tmp_path / "other.safetensors"
    other.write_bytes(lora.read_bytes())
    err = _fails(capsys, "infer", str(wav), "-o", str(tmp_path / "x.wav"), "--hf-repo", str(ckpt),
                 "--moshi-weight", str(q), "--lora-weight", str(other))
    assert "adapter.safetensors merged" in err and "openmoshi quantize --lora-weight" in err


def test_lora_on_a_file_quantized_without_one(ckpt, wav, lora, tmp_path, capsys):
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", "int8")
    err = _fails(capsys, "infer", str(wav), "-o", str(tmp_path / "x.wav"), "--hf-repo", str(ckpt),
                 "--moshi-weight", str(q), "--lora-weight", str(lora))
    assert "has no LoRA adapter merged" in err and "openmoshi quantize --lora-weight" in err


def test_wrong_config_names_the_keys(ckpt, wav, tmp_path, capsys):
    q = tmp_path / "q.safetensors"
    _quantize(ckpt, q, "--mode", "int8")
    raw = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, num_layers=3, depformer_dim=64)))
    err = _fails(capsys, "infer", str(wav), "-o", str(tmp_path / "x.wav"), "--hf-repo", str(ckpt),
                 "--config-path", str(tmp_path / "config.json"), "--moshi-weight", str(q))
    assert "quantized from a model with another config" in err
    assert "depformer_dim=128 (given: 64)" in err and "num_layers=2 (given: 3)" in err


def test_usage_errors(ckpt, tmp_path, capsys):
    base = ["quantize", "--hf-repo", str(ckpt)]
    out = str(tmp_path / "q.safetensors")
    assert "invalid choice: 'int3'" in _fails(capsys, *base, "--mode", "int3", "-o", out)
    assert "invalid choice: 100" in _fails(capsys, *base, "--mode", "int4", "--group-size", "100", "-o", out)
    assert "int4 only" in _fails(capsys, *base, "--mode", "int8", "--group-size", "64", "-o", out)
    assert "folder" in _fails(capsys, *base, "--mode", "int8", "-o", str(tmp_path / "nowhere" / "q.safetensors"))
    assert "is a directory" in _fails(capsys, *base, "--mode", "int8", "-o", str(tmp_path))
    source = ckpt / NAMES["moshi_name"]
    assert "is the input" in _fails(capsys, *base, "--mode", "int8", "-o", str(source))
    assert "does not exist" in _fails(capsys, *base, "--mode", "int8", "-o", out,
                                      "--moshi-weight", str(tmp_path / "missing.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[:5000])
    assert "truncated" in _fails(capsys, *base, "--mode", "int8", "-o", out, "--moshi-weight", str(truncated))
    _quantize(ckpt, Path(out), "--mode", "int8")
    err = _fails(capsys, *base, "--mode", "int4", "-o", str(tmp_path / "q2.safetensors"), "--moshi-weight", out)
    assert "already quantized (int8)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors", "truncated.safetensors"]


def test_group_size_must_divide_every_width(tmp_path, capsys):
    """The default tiny model has 176-wide feed-forwards: no int4 group fits, int8 is the way."""
    folder = tmp_path / "tiny"
    make_checkpoint(folder, "moshi")
    err = _fails(capsys, "quantize", "--hf-repo", str(folder), "--mode", "int4", "--group-size", "32",
                 "-o", str(tmp_path / "q.safetensors"))
    assert "--group-size 32 does not divide the input width 176 of transformer.layers.0.gating.linear_out" in err
    assert "use --mode int8" in err
    assert not (tmp_path / "q.safetensors").exists()


def test_interrupted_write_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(SystemExit):
        main(["quantize", "--hf-repo", str(ckpt), "--mode", "int8", "-o", str(tmp_path / "q.safetensors")])
    assert list(tmp_path.iterdir()) == []


def test_parser_constants_match_the_library():
    assert cli_quantize.MODES == quantize.MODES
    assert cli_quantize.GROUP_SIZES == quantize.GROUP_SIZES
    assert cli_quantize.DEFAULT_GROUP_SIZE == quantize.DEFAULT_GROUP_SIZE
