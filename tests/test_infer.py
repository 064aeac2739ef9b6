"""`openmoshi infer` and openmoshi.inference.offline against the official offline loop, on real speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from infer_utils import MOSHI, make_checkpoint, official_loop
from official_utils import speech
from openmoshi.audio import load_audio, save_wav
from openmoshi.cli.main import main
from openmoshi.inference.offline import load

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
SECONDS = 0.7  # 8 whole frames (the partial 9th is dropped, as the official loop does)
FRAMES = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("infer") / "moshi"
    make_checkpoint(folder, "moshi")
    return folder


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    save_wav(path, speech(SECONDS)[None], float32=True)
    return path


def test_greedy_matches_official(ckpt, wav, tmp_path, capsys):
    """`openmoshi infer --greedy` == the official offline loop on the same files."""
    out, printed = official_loop(ckpt, load_audio(wav), use_sampling=False)
    (ref_text, ref_pcm), = out
    wav_out, transcript = tmp_path / "out.wav", tmp_path / "t.json"
    assert main(["infer", str(wav), "-o", str(wav_out), "--transcript", str(transcript), "--greedy",
                 "--float32", "--hf-repo", str(ckpt), "--device", "cpu"]) == 0
    live = capsys.readouterr().out
    pcm = load_audio(wav_out)
    assert pcm.shape == ref_pcm.shape == (1, FRAMES * 1920)
    assert (pcm - ref_pcm).abs().max() < 1e-4
    data = json.loads(transcript.read_text())
    shown = [t for t in ref_text.tolist() if t not in (0, 3)]
    assert [p["id"] for p in data["pieces"]] == shown
    assert data["text"] == printed.strip() and data["text"] in live
    times = [p["start"] for p in data["pieces"]]
    assert times == sorted(times) and all(round(t / 0.08) * 0.08 == pytest.approx(t) for t in times)


def test_sampling_matches_official(ckpt, wav):
    """Seeded sampling consumes the random stream like the official loop: same tokens and audio."""
    (ref_text, ref_pcm), = official_loop(ckpt, load_audio(wav), seed=7)[0]
    result = load(str(ckpt), device="cpu").run(str(wav), seed=7)
    assert result.text_tokens == ref_text.tolist()
    assert (result.audio - ref_pcm).abs().max() < 1e-4


def test_batch_stereo_and_silence_tail(ckpt, wav, tmp_path):
    short = tmp_path / "short.wav"
    save_wav(short, speech(0.5)[None])
    outdir = tmp_path / "outs"
    outdir.mkdir()
    assert main(["infer", str(wav), str(short), "-o", str(outdir), "--stereo", "--silence-tail", "0.3",
                 "--greedy", "--hf-repo", str(ckpt), "-q"]) == 0
    long_out, short_out = load_audio_stereo(outdir / "speech.wav"), load_audio_stereo(outdir / "short.wav")
    assert long_out.shape[0] == 2 and long_out.shape[1] == int((SECONDS + 0.3) * 24000) // 1920 * 1920
    assert short_out.shape[1] == int(0.8 * 24000) // 1920 * 1920
    # The left channel is the input.
    n = load_audio(wav).shape[1]
    assert (long_out[0, :n] - load_audio(wav)[0]).abs().max() < 1e-3


def test_quantized_model_runs(ckpt, wav, tmp_path):
    """--quantize int8 on a command that loads a model: the transformer layers are quantized and it runs."""
    assert main(["infer", str(wav), "-o", str(tmp_path / "q.wav"), "--greedy", "--quantize", "int8",
                 "--hf-repo", str(ckpt), "-q"]) == 0
    assert load_audio(tmp_path / "q.wav").shape == (1, FRAMES * 1920)
    model = load(str(ckpt), device="cpu", quantize="int8")
    assert type(model.model.lm.transformer.layers[0].self_attn.in_proj).__name__ == "QuantizedLinear"


def load_audio_stereo(path: Path) -> torch.Tensor:
    import wave

    import numpy as np

    with wave.open(str(path)) as f:
        data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).reshape(-1, f.getnchannels())
    return torch.from_numpy(data.T / 32768.0).float()


@pytest.mark.parametrize("kind", ["empty", "not_audio", "short"])
def test_bad_audio(ckpt, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_audio":
        path.write_text("hello, I am not a wav file\n" * 20)
    else:
        save_wav(path, speech(0.05)[None])
    with pytest.raises(SystemExit) as e:
        main(["infer", str(path), "-o", str(tmp_path / "o.wav"), "--hf-repo", str(ckpt)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert {"empty": "empty", "not_audio": "not a readable audio", "short": "too short"}[kind] in err


@pytest.mark.skipif(shutil.which("sox") is None, reason="needs sox")
def test_8khz_stereo_is_converted(ckpt, tmp_path):
    mono = tmp_path / "m.wav"
    save_wav(mono, speech(0.4)[None])
    st = tmp_path / "st8k.wav"
    subprocess.run(["sox", str(mono), "-r", "8000", "-c", "2", str(st)], check=True)
    result = load(str(ckpt)).run(str(st), greedy=True)
    assert result.audio.shape == (1, 5 * 1920)


def test_stt(tmp_path):
    folder = tmp_path / "stt"
    make_checkpoint(folder, "stt", seed=1)
    wav = tmp_path / "in.wav"
    save_wav(wav, speech(0.3)[None], float32=True)
    _, printed = official_loop(folder, load_audio(wav), use_sampling=False)
    transcript = tmp_path / "t.json"
    assert main(["infer", str(wav), "--transcript", str(transcript), "--greedy", "--hf-repo", str(folder), "-q"]) == 0
    data = json.loads(transcript.read_text())
    assert data["text"] == printed.strip() and data["pieces"]
    # 0.4 s of prefix and 1 + 0.5 s after: 27 frames; times are shifted back by prefix + delay.
    last = round(27 * 0.08 - 0.9, 3)
    assert all(0.0 <= p["start"] <= last + 1e-6 for p in data["pieces"])
    with pytest.raises(SystemExit):  # no audio out
        main(["infer", str(wav), "-o", str(tmp_path / "o.wav"), "--hf-repo", str(folder)])


def test_conditioned_hibiki_matches_official(tmp_path):
    """A Hibiki with a LUT description conditioner: conditioned on "very_good" as the official loop."""
    folder = tmp_path / "hibiki_cond"
    cond = {"conditioners": {"description": {"type": "lut", "lut": {
        "n_bins": 31, "dim": 16, "tokenizer": "noop", "possible_values": ["very_bad", "very_good"]}}},
        "fuser": {"sum": ["description"]}}
    make_checkpoint(folder, "hibiki", seed=2, lm_kwargs=dict(MOSHI, **cond))
    pcm = speech(0.3)[None]
    model = load(str(folder))
    result = model.run(pcm, greedy=True)
    (ref_text, ref_pcm), = official_loop(folder, pcm, use_sampling=False)[0]
    assert result.text_tokens == ref_text.tolist()
    assert (result.audio - ref_pcm).abs().max() < 1e-4
    # Classifier-free guidance ('very_good' against 'very_bad'), as the official --cfg-coef 3
    guided = model.run(pcm, greedy=True, cfg_coef=3.0)
    (ref_text, ref_pcm), = official_loop(folder, pcm, use_sampling=False, cfg_coef=3.0)[0]
    assert guided.text_tokens == ref_text.tolist()
    assert (guided.audio - ref_pcm).abs().max() < 1e-4
    assert guided.text_tokens != result.text_tokens or not torch.equal(guided.audio, result.audio)


def test_cfg_coef_needs_a_conditioned_model(tmp_path, capsys):
    folder = tmp_path / "hibiki"
    make_checkpoint(folder, "hibiki", seed=2)
    wav = tmp_path / "in.wav"
    save_wav(wav, speech(0.2)[None], float32=True)
    with pytest.raises(SystemExit):
        main(["infer", str(wav), "-o", str(tmp_path / "o.wav"), "--hf-repo", str(folder), "--cfg-coef", "3"])
    assert "--cfg-coef needs a conditioned model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a conditioned model"):
        load(str(folder)).run(str(wav), cfg_coef=3.0)


def test_hibiki_stops_at_eos(tmp_path):
    folder = tmp_path / "hibiki"
    make_checkpoint(folder, "hibiki", seed=2)
    pcm = speech(0.3)[None]
    model = load(str(folder))
    result = model.run(pcm, greedy=True)
    assert result.eos and result.text_tokens[-1] == 2
    (ref_text, ref_pcm), = official_loop(folder, pcm, use_sampling=False)[0]
    assert result.text_tokens == ref_text.tolist()
    assert (result.audio - ref_pcm).abs().max() < 1e-4
