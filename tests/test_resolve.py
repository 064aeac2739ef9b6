"""Model resolution: local paths, file://, hf:// in a fake offline hub cache, legacy repos, q8, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer_utils import NAMES, make_checkpoint
from openmoshi.loading.formats.q8 import dequantize_q8
from openmoshi.loading.lm import load_lm
from openmoshi.cli.main import main
from openmoshi.lm.config import MOSHI_7B
from openmoshi.loading.resolve import ResolveError, resolve_files

REV = "0123456789abcdef0123456789abcdef01234567"
LEGACY = ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "repo"
    make_checkpoint(folder, "moshi")
    return folder


def fake_cache(root: Path, repo: str, files: dict[str, Path], no_config: bool = False) -> Path:
    """The layout huggingface_hub reads: models--owner--name/{refs/main, snapshots/REV/FILE}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    for name, src in files.items():
        os.link(src, snap / name)
    if no_config:  # what the hub client records after a 404 on config.json
        (folder / ".no_exist" / REV).mkdir(parents=True)
        (folder / ".no_exist" / REV / "config.json").touch()
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_paths_and_file_uris(ckpt):
    files = resolve_files(None, ckpt / NAMES["moshi_name"], f"file://{ckpt / NAMES['mimi_name']}",
                          str(ckpt / NAMES["tokenizer_name"]), f"file://{ckpt / 'config.json'}")
    assert files.moshi_weight == ckpt / NAMES["moshi_name"]
    assert files.mimi_weight == ckpt / NAMES["mimi_name"]
    assert files.config.lm.card == 2048 and files.config.model_type == "moshi"
    # A local folder as --hf-repo: names come from its config.json.
    files = resolve_files(str(ckpt))
    assert files.tokenizer == ckpt / NAMES["tokenizer_name"] and files.config_path == ckpt / "config.json"


def test_fake_hub_cache_offline(ckpt, offline):
    names = ["config.json", *NAMES.values()]
    fake_cache(offline, "owner/tiny", {n: ckpt / n for n in names})
    files = resolve_files("owner/tiny")
    assert files.moshi_weight.name == NAMES["moshi_name"] and REV in str(files.moshi_weight)
    assert files.config.lm.dim == 64
    files = resolve_files(None, f"hf://owner/tiny/{NAMES['moshi_name']}", ckpt / NAMES["mimi_name"],
                          ckpt / NAMES["tokenizer_name"], "hf://owner/tiny/config.json")
    assert REV in str(files.moshi_weight) and REV in str(files.config_path)


def test_legacy_repo_without_config(ckpt, offline, tmp_path):
    fake_cache(offline, "owner/legacy", {n: ckpt / NAMES["moshi_name"] for n in LEGACY}, no_config=True)
    files = resolve_files("owner/legacy")
    assert files.config.lm == MOSHI_7B and files.config_path is None
    assert [f.name for f in (files.moshi_weight, files.mimi_weight, files.tokenizer)] == list(LEGACY)
    local = tmp_path / "legacy_dir"
    local.mkdir()
    for n in LEGACY:
        (local / n).touch()
    assert resolve_files(str(local)).config.lm == MOSHI_7B


def test_offline_missing_files_clear_error(offline, capsys, tmp_path):
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"RIFF")
    with pytest.raises(SystemExit) as e:
        main(["infer", str(wav), "-o", str(tmp_path / "o.wav"), "--hf-repo", "kyutai/moshiko-pytorch-bf16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for needed in ("HF_HUB_OFFLINE", "config.json", "model.safetensors", "--moshi-weight", "--mimi-weight",
                   "--tokenizer", "tokenizer_spm_32k_3.model"):
        assert needed in err, needed


def test_missing_local_file(ckpt, capsys, tmp_path):
    with pytest.raises(ResolveError, match="--moshi-weight .*does not exist"):
        resolve_files(str(ckpt), moshi_weight=tmp_path / "nope.safetensors")
    with pytest.raises(ResolveError, match="hf://OWNER/REPO/FILE"):
        resolve_files(str(ckpt), mimi_weight="hf://only-owner")
    empty = tmp_path / "empty_repo"
    empty.mkdir()
    (empty / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(ResolveError, match=f"{NAMES['moshi_name']} not found in .*--moshi-weight"):
        resolve_files(str(empty))


def test_q8_dequantize(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / NAMES["moshi_name"]))
    q8 = {}
    for k, v in state.items():
        if v.dim() == 2 and "emb" not in k:  # the linear layers
            scb = v.abs().amax(dim=1).float()  # bitsandbytes row-wise absmax
            q8[k] = torch.round(v / scb[:, None] * 127).to(torch.int8)
            q8[k + "_scb"] = scb
        else:
            q8[k] = v
    assert any(k.endswith("_scb") for k in q8)
    deq = dequantize_q8(q8, torch.float32)
    for k, v in state.items():
        assert (deq[k] - v).abs().max() <= v.abs().max() / 127, k
    save_file(q8, str(tmp_path / "model.q8.safetensors"))
    cfg = resolve_files(str(ckpt)).config.lm
    lm = load_lm(tmp_path / "model.q8.safetensors", cfg, dtype=torch.float32)
    ref = load_lm(ckpt / NAMES["moshi_name"], cfg, dtype=torch.float32)
    w, r = lm.text_linear.weight(), ref.text_linear.weight  # int8, dequantized to the run dtype
    assert lm.text_linear.qweight.dtype == torch.int8
    assert w.dtype == torch.float32 and (w - r).abs().max() < r.abs().max() / 100


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_cli_offline_hub_cache_end_to_end(ckpt, tmp_path):
    """`openmoshi infer` as a user runs it: a fresh process, HF_HUB_OFFLINE=1, a hub cache."""
    from official_utils import speech

    from openmoshi.audio import save_wav

    cache = tmp_path / "hub"
    fake_cache(cache, "owner/tiny", {n: ckpt / n for n in ["config.json", *NAMES.values()]})
    save_wav(tmp_path / "in.wav", speech(0.3)[None])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "openmoshi", "infer", str(tmp_path / "in.wav"), "-o",
                        str(tmp_path / "out.wav"), "--hf-repo", "owner/tiny", "--greedy", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.wav").stat().st_size > 44 and "real-time factor" in r.stderr
