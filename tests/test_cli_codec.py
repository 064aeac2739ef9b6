"""`openmoshi codec encode/decode`, run as a user would (a subprocess), on espeak-ng speech with a
random Mimi checkpoint in the official layout; results checked against the official package."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from official_utils import make_official_mimi, save_official_mimi
from safetensors.torch import load_file, save_file

from openmoshi.audio import load_audio

FRAME = 1920  # samples per Mimi frame at 24 kHz
SEED = 0

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


def openmoshi(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openmoshi", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2 and exactly one line on stderr, `openmoshi: error: ...`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("openmoshi: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def mimi_weight(workdir):
    path = workdir / "tokenizer-random.safetensors"
    save_official_mimi(path, SEED)
    return path


@pytest.fixture(scope="module")
def speech_wav(workdir):
    """About 3 s of espeak-ng speech, as espeak writes it (22.05 kHz mono)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    path = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello, this is a test of the Mimi codec."],
                   check=True, capture_output=True)
    return path


def read_wav(path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return data.astype(np.float32) / 32768.0, f.getframerate(), f.getnchannels()


@needs_espeak
def test_encode_then_decode_matches_the_official_mimi(workdir, mimi_weight, speech_wav):
    codes_path, out_path = workdir / "codes.safetensors", workdir / "out.wav"
    result = openmoshi("codec", "encode", speech_wav, codes_path, "--mimi-weight", mimi_weight,
                       "--device", "cpu")
    assert result.returncode == 0, result.stderr
    pcm = load_audio(speech_wav)  # [1, N] at 24 kHz
    codes = load_file(codes_path)["codes"]
    frames = math.ceil(pcm.shape[1] / FRAME)
    assert codes.dtype == torch.int64 and codes.shape == (1, 8, frames)
    assert 0 <= codes.min() and codes.max() < 2048
    assert len(codes.unique()) > 20  # a Mimi with random codebooks gives varied codes

    official = make_official_mimi(SEED)
    official.set_num_codebooks(8)
    with torch.no_grad():
        expected = official.encode(pcm[None])  # [1, 8, T]
    assert (codes == expected).float().mean() > 0.99  # float rounding may flip a rare tie

    result = openmoshi("codec", "decode", codes_path, out_path, "--mimi-weight", mimi_weight,
                       "--device", "cpu")
    assert result.returncode == 0, result.stderr
    audio, rate, channels = read_wav(out_path)
    assert rate == 24000 and channels == 1 and len(audio) == frames * FRAME
    with torch.no_grad():
        reference = official.decode(codes)[0, 0].clamp(-1, 1).numpy()  # [T * 1920]
    np.testing.assert_allclose(audio, reference, atol=1e-4)  # 16-bit rounding: 1.5e-5


@needs_espeak
def test_num_codebooks(workdir, mimi_weight, speech_wav):
    codes_path, out_path = workdir / "codes3.safetensors", workdir / "out3.wav"
    result = openmoshi("codec", "encode", speech_wav, codes_path, "--mimi-weight", mimi_weight,
                       "--num-codebooks", 3)
    assert result.returncode == 0, result.stderr
    codes = load_file(codes_path)["codes"]
    frames = math.ceil(load_audio(speech_wav).shape[1] / FRAME)
    assert codes.shape == (1, 3, frames)
    assert_user_error(openmoshi("codec", "decode", codes_path, out_path, "--mimi-weight",
                                mimi_weight, "--num-codebooks", 8), "has 3 codebooks")
    result = openmoshi("codec", "decode", codes_path, out_path, "--mimi-weight", mimi_weight)
    assert result.returncode == 0, result.stderr
    audio, rate, _ = read_wav(out_path)
    assert rate == 24000 and len(audio) == frames * FRAME


def test_a_short_file_gives_one_frame(workdir, mimi_weight):
    path = workdir / "short.wav"
    with wave.open(str(path), "wb") as f:  # 0.05 s at 44.1 kHz stereo
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(44100)
        f.writeframes((np.random.default_rng(0).normal(0, 3000, (2205, 2))).astype("<i2").tobytes())
    result = openmoshi("codec", "encode", path, workdir / "short.safetensors", "--mimi-weight",
                       mimi_weight)
    assert result.returncode == 0, result.stderr
    assert load_file(workdir / "short.safetensors")["codes"].shape == (1, 8, 1)


def test_help_and_entry_point():
    result = openmoshi("codec", "encode", "--help")
    assert result.returncode == 0 and "--mimi-weight" in result.stdout
    script = shutil.which("openmoshi")
    if script is not None:  # installed with pip: the console script is the same program
        result = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith("openmoshi ")


def test_argument_errors(workdir):
    audio_file = workdir / "any.wav"
    audio_file.write_bytes(b"")
    out = workdir / "x.safetensors"
    cases = [
        ((), "required: COMMAND"),
        (("codec",), "required"),
        (("codec", "transcode"), "invalid choice"),
        (("codec", "encode", audio_file, out), "--mimi-weight"),
        (("codec", "encode", audio_file, out, "--mimi-weight", "w", "--num-codebooks", "0"),
         "must be between 1 and 32, got 0"),
        (("codec", "encode", audio_file, out, "--mimi-weight", "w", "--num-codebooks", "33"),
         "must be between 1 and 32, got 33"),
        (("codec", "encode", audio_file, out, "--mimi-weight", "w", "--num-codebooks", "two"),
         "expected an integer"),
        (("codec", "encode", audio_file, out, "--mimi-weight", "w", "--bogus"),
         "unrecognized arguments"),
    ]
    for args, fragment in cases:
        assert_user_error(openmoshi(*args), fragment)


def test_encode_errors(workdir, mimi_weight):
    text = workdir / "notes.wav"
    text.write_text("this is not audio\n" * 10)
    empty = workdir / "empty.wav"
    empty.write_bytes(b"")
    out = workdir / "e.safetensors"
    w = ("--mimi-weight", mimi_weight)
    cases = [
        (("missing.wav", out, *w), "audio file missing.wav does not exist"),
        ((empty, out, *w), "is empty"),
        ((text, out, *w), "is not a readable audio file"),
        ((text, out, "--mimi-weight", workdir / "nope.safetensors"),
         "Mimi checkpoint"),
        ((text, workdir / "no" / "dir" / "c.safetensors", *w), "does not exist"),
        ((text, out, *w, "--device", "cuda:0"), "cuda") if not torch.cuda.is_available() else None,
    ]
    for case in filter(None, cases):
        args, fragment = case
        assert_user_error(openmoshi("codec", "encode", *args), fragment)


@needs_espeak
def test_encode_with_a_bad_checkpoint(workdir, speech_wav):
    bad = workdir / "bad.safetensors"
    save_file({"encoder.weight": torch.zeros(3)}, bad)
    result = openmoshi("codec", "encode", speech_wav, workdir / "b.safetensors",
                       "--mimi-weight", bad)
    assert_user_error(result, str(bad))


def test_decode_errors(workdir, mimi_weight):
    def codes_file(name, tensors):
        path = workdir / name
        save_file(tensors, path)
        return path

    garbage = workdir / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    good = torch.zeros(1, 8, 4, dtype=torch.int64)
    out = workdir / "d.wav"
    cases = [
        (workdir / "missing.safetensors", "does not exist"),
        (garbage, "cannot read codes file"),
        (codes_file("nokey.safetensors", {"tokens": good}), "has no 'codes' tensor (found: tokens)"),
        (codes_file("float.safetensors", {"codes": good.float()}), "must be integers"),
        (codes_file("2d.safetensors", {"codes": good[0]}), "must have shape [B, K, T]"),
        (codes_file("empty.safetensors", {"codes": good[:, :, :0]}), "has no frames"),
        (codes_file("batch.safetensors", {"codes": good.repeat(2, 1, 1)}), "B must be 1"),
        (codes_file("k40.safetensors", {"codes": torch.zeros(1, 40, 4, dtype=torch.int64)}),
         "has 40 codebooks"),
        (codes_file("neg.safetensors", {"codes": good - 1}), "negative"),
        (codes_file("big.safetensors", {"codes": good + 2048}), "2048"),  # found by Mimi itself
    ]
    for path, fragment in cases:
        assert_user_error(openmoshi("codec", "decode", path, out, "--mimi-weight", mimi_weight),
                          fragment)
    assert not out.exists()
