"""`openmoshi tts`: the audio and word timings of the official `moshi-tts` pipeline (TTSModel.generate,
then Mimi decoding of the frames from `delay_steps` on, cut at end_step + final_padding) on tiny
random checkpoints; JSONL batches; audio-prefix voices; and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openmoshi.audio import load_audio, save_wav
from openmoshi.cli.main import main

from tts_utils import make_tts_checkpoint, make_voice, official_tts

TEXT = "Hello there, how are you? Fine thanks."


@pytest.fixture(scope="module")
def emb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tts_cli_emb")
    make_tts_checkpoint(folder, "emb", seed=3)
    make_voice(folder / "voices", "alice", 1)
    make_voice(folder / "voices" / "sub", "bob", 2)
    return folder


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def official_pipeline(tts, turns, voices=None, prefix_path=None, cfg=None):
    """moshi-tts's _flush for one request: (pcm [N], transcript, end_step, prefix frames)."""
    entries = [tts.prepare_script(turns, padding_between=1)]
    attrs = [tts.make_condition_attributes(voices or [], cfg)]
    prefixes = None if prefix_path is None else [tts.get_prefix(prefix_path)]
    result = tts.generate(entries, attrs, prefixes=prefixes)
    wavs = []
    with torch.no_grad(), tts.mimi.streaming(1):
        for frame in result.frames[tts.delay_steps:]:
            wavs.append(tts.mimi.decode(frame[:, 1:]))
    wav = torch.cat(wavs, dim=-1)[0, 0]
    end = result.end_steps[0]
    wav = wav[:int(24000 * (end + tts.final_padding) / 12.5)]
    start = 0 if prefixes is None else prefixes[0].shape[-1]
    return wav[int(24000 * start / 12.5):], result.all_transcripts[0], end, start


def test_text_to_wav_matches_moshi_tts(emb_folder, tmp_path, capsys):
    wav, words = tmp_path / "out.wav", tmp_path / "words.json"
    code, out, err = run(capsys, "tts", TEXT, "-o", wav, "--voice", "alice", "--voice-repo", emb_folder / "voices",
                         "--hf-repo", emb_folder, "--greedy", "--words", words, "--device", "cpu")
    assert code == 0, err
    tts = official_tts(emb_folder, temp=0.0, cfg_coef=1.0)
    ref, transcript, end, _ = official_pipeline(tts, [TEXT], [emb_folder / "voices" / "alice.0badc0de@7.safetensors"], cfg=2.0)
    pcm = load_audio(wav)[0]
    assert pcm.shape == ref.shape and ref.abs().max() > 0.01
    assert (pcm - ref.clamp(-1, 1)).abs().max() < 2e-4  # 16-bit wav
    timings = json.loads(words.read_text())
    assert [(w["text"], round(w["start"] * 12.5)) for w in timings["words"]] == [tuple(t) for t in transcript]
    assert timings["finished"] and timings["words"][-1]["end"] == pytest.approx(end / 12.5)
    assert "Hello" in out and f"wrote {wav}" in err


def test_jsonl_batch(emb_folder, tmp_path, capsys):
    jsonl = tmp_path / "req.jsonl"
    jsonl.write_text(json.dumps({"turns": ["One two three.", "Four five."], "voices": ["alice", "sub/bob"], "id": "a"})
                     + "\n\n" + json.dumps({"turns": [TEXT], "voices": ["alice"], "id": "b"}) + "\n")
    out_dir = tmp_path / "outs"
    code, out, err = run(capsys, "tts", "--jsonl", jsonl, "-o", out_dir, "--voice-repo", emb_folder / "voices",
                         "--hf-repo", emb_folder, "--greedy", "--batch-size", 2, "-q")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.json", "a.wav", "b.json", "b.wav"]
    # A request's result does not depend on its batch: b alone gives the same audio.
    code, _, err = run(capsys, "tts", TEXT, "-o", tmp_path / "b.wav", "--voice", "alice", "--voice-repo",
                       emb_folder / "voices", "--hf-repo", emb_folder, "--greedy", "-q")
    assert code == 0, err
    assert torch.allclose(load_audio(out_dir / "b.wav"), load_audio(tmp_path / "b.wav"), atol=1e-4)
    assert json.loads((out_dir / "a.json").read_text())["words"][0]["text"] == "One"


def test_audio_prefix_voice_matches_moshi_tts(tmp_path, capsys):
    from official_utils import speech

    folder = tmp_path / "prefix"
    make_tts_checkpoint(folder, "prefix", seed=5)
    voice = tmp_path / "me.wav"
    save_wav(voice, speech(1.5)[None])
    wav = tmp_path / "out.wav"
    code, out, err = run(capsys, "tts", "Hello there.", "-o", wav, "--voice", voice, "--hf-repo", folder, "--greedy", "-q")
    assert code == 0, err
    tts = official_tts(folder, temp=0.0, cfg_coef=2.0)
    ref, transcript, end, start = official_pipeline(tts, ["Hello there."], prefix_path=voice)
    assert start > 10
    pcm = load_audio(wav)[0]
    assert pcm.shape == ref.shape and (pcm - ref.clamp(-1, 1)).abs().max() < 2e-4


@pytest.mark.parametrize("argv, message", [
    (["tts", "Hi.", "-o", "{tmp}/x.wav", "--voice", "nobody", "--voice-repo", "{voices}", "--hf-repo", "{emb}"],
     "voice 'nobody' not found: no nobody.0badc0de@7.safetensors in"),
    (["tts", "Hi.", "-o", "{tmp}/x.wav", "--hf-repo", "{emb}"], "give a voice: --voice NAME"),
    (["tts", "Hi.", "-o", "{tmp}/x.wav", "--voice", "alice", "--voice-repo", "{voices}", "--hf-repo", "{emb}",
      "--cfg-coef", "2.2"], "takes one of 1.0, 1.5"),
    (["tts", "Hi.", "-o", "{tmp}/x.wav", "--voice", "{tmp}/v.wav", "--hf-repo", "{emb}"], "not .wav"),
    (["tts", "--jsonl", "{tmp}/bad.jsonl", "--hf-repo", "{emb}"], "bad.jsonl line 2: missing key 'voices'"),
    (["tts", "--jsonl", "{tmp}/bad2.jsonl", "--hf-repo", "{emb}"], "bad2.jsonl line 1: not valid JSON"),
    (["tts", "Hi.", "--jsonl", "{tmp}/bad.jsonl"], "give one input"),
    (["tts", "Hi.", "-o", "{tmp}/x.wav", "--voice", "a", "--hf-repo", "{moshi}"], "not a TTS model"),
    (["infer", "{tmp}/v.wav", "-o", "{tmp}/x.wav", "--hf-repo", "{emb}"], "this is a Kyutai TTS model"),
])
def test_errors_are_one_line(emb_folder, tmp_path, capsys, argv, message):
    from infer_utils import make_checkpoint

    (tmp_path / "v.wav").write_bytes(b"RIFF")
    (tmp_path / "bad.jsonl").write_text('{"turns": ["a"], "voices": ["alice"], "id": "x"}\n{"turns": ["b"], "id": "y"}\n')
    (tmp_path / "bad2.jsonl").write_text('{"turns": \n')
    moshi = tmp_path / "moshi"
    if "{moshi}" in argv:
        make_checkpoint(moshi)
    argv = [a.format(tmp=tmp_path, voices=emb_folder / "voices", emb=emb_folder, moshi=moshi) for a in argv]
    code, out, err = run(capsys, *argv, "--device", "cpu")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openmoshi: error: ") and message in lines[0], err
    assert not (tmp_path / "x.wav").exists()


def test_text_from_stdin_and_file_equal_the_argument(emb_folder, tmp_path, capsys, monkeypatch):
    import io

    common = ["--voice", "alice", "--voice-repo", emb_folder / "voices", "--hf-repo", emb_folder, "--greedy", "-q"]
    assert run(capsys, "tts", "One two three.", "-o", tmp_path / "a.wav", *common)[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("One two\nthree.\n"))
    assert run(capsys, "tts", "-", "-o", tmp_path / "b.wav", *common)[0] == 0
    (tmp_path / "t.txt").write_text("One   two three.")
    assert run(capsys, "tts", "--text-file", tmp_path / "t.txt", "-o", tmp_path / "c.wav", *common)[0] == 0
    a = load_audio(tmp_path / "a.wav")
    assert torch.equal(a, load_audio(tmp_path / "b.wav")) and torch.equal(a, load_audio(tmp_path / "c.wav"))
