"""`openmoshi annotate`: a tiny Whisper with random weights, saved in Whisper's checkpoint format,
transcribes stereo espeak-ng speech through whisper's own loading code and whisper_timestamped.
A random model says nonsense, so the end-to-end tests check the file's structure and invariants;
the conversion from whisper_timestamped's result is checked on a hand-written result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from openmoshi.audio import load_audio, save_wav
from openmoshi.cli import annotate as cli_annotate
from openmoshi.cli.main import main
from openmoshi.training import annotate
from openmoshi.training.manifest import MAIN_SPEAKER, DataError, Word, read_alignments

whisper = pytest.importorskip("whisper")
pytest.importorskip("whisper_timestamped")

SEED = 1  # a random model that emits words on this speech (others emit one long CJK "word")


@pytest.fixture(scope="module")
def whisper_pt(tmp_path_factory):
    """A random Whisper in the layout of whisper's own checkpoints. n_text_ctx is small because
    whisper decodes at most n_text_ctx / 2 tokens per window: a random model never stops early."""
    dims = whisper.model.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=1)
    torch.manual_seed(SEED)
    model = whisper.model.Whisper(dims)
    # Whisper leaves the decoder's positions as torch.empty (a checkpoint fills them): garbage,
    # sometimes NaN, which breaks the DTW alignment.
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    path = tmp_path_factory.mktemp("whisper") / "random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """3 s of espeak-ng speech, 24 kHz [1, N]."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    path = tmp_path_factory.mktemp("speech") / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello there, this is a short test of the annotation."],
                   check=True, capture_output=True)
    return load_audio(path)  # [1, N], 22.05 kHz mono -> 24 kHz


def make_dataset(folder, speech, name: str = "a.wav"):
    """A manifest listing one wav: the speech on channel 0, silence on channel 1."""
    folder.mkdir(parents=True, exist_ok=True)
    save_wav(folder / name, torch.cat([speech, torch.zeros_like(speech)]), 24000)  # [2, N]
    manifest = folder / "data.jsonl"
    manifest.write_text(json.dumps({"path": name, "duration": speech.shape[1] / 24000}) + "\n")
    return manifest, folder / name


def run(capsys, *args) -> tuple[int, list[str]]:
    """`openmoshi annotate ARGS` in this process: the exit code and the lines on stderr."""
    try:
        code = main(["annotate", *map(str, args)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_valid(json_path, duration: float) -> list:
    data = json.loads(json_path.read_text())
    alignments = data["alignments"]
    for item in alignments:
        text, (start, end), speaker = item
        assert isinstance(text, str) and text == text.strip() and text
        assert speaker == MAIN_SPEAKER
        assert 0 <= start <= end <= duration
        assert round(start, 3) == start and round(end, 3) == end
    starts = [item[1][0] for item in alignments]
    assert starts == sorted(starts)
    return alignments


def test_annotate_writes_alignments_that_training_reads(tmp_path, capsys, whisper_pt, speech):
    manifest, wav = make_dataset(tmp_path / "data", speech)
    duration = speech.shape[1] / 24000
    code, err = run(capsys, manifest, "--model", whisper_pt, "--language", "en", "--device", "cpu")
    assert code == 0, err
    alignments = assert_valid(wav.with_suffix(".json"), duration)
    assert alignments, "the random model of SEED emits words on this speech"
    assert err[0] == f"annotated a.wav: {len(alignments)} words", err
    assert err[-1].startswith("done: 1 annotated") and "0 skipped" in err[-1]
    # What annotate writes, the fine-tuning data reader accepts.
    assert len(read_alignments(wav, audio_seconds=duration).words) <= len(alignments)
    assert not list(wav.parent.glob(".*.tmp"))


def test_existing_alignment_is_skipped_or_overwritten_keeping_other_keys(tmp_path, capsys, whisper_pt, speech):
    manifest, wav = make_dataset(tmp_path / "data", speech)
    json_path = wav.with_suffix(".json")
    before = json.dumps({"alignments": [["old", [0.1, 0.2], MAIN_SPEAKER]],
                         "text_conditions": {"description": "calm"}}, indent=1)
    json_path.write_text(before)

    code, err = run(capsys, manifest, "--model", whisper_pt, "--device", "cpu")
    assert code == 0 and json_path.read_text() == before
    assert err[0].startswith("skipped a.wav: a.json exists") and "0 annotated" in err[-1]

    code, err = run(capsys, manifest, "--model", whisper_pt, "--device", "cpu", "--overwrite")
    assert code == 0, err
    data = json.loads(json_path.read_text())
    assert data["text_conditions"] == {"description": "calm"}
    assert data["alignments"] != [["old", [0.1, 0.2], MAIN_SPEAKER]]
    assert_valid(json_path, speech.shape[1] / 24000)


def test_a_skipped_manifest_needs_no_model(tmp_path, capsys, speech):
    manifest, wav = make_dataset(tmp_path / "data", speech)
    wav.with_suffix(".json").write_text('{"alignments": []}')
    code, err = run(capsys, manifest, "--model", tmp_path / "absent.pt")
    assert code == 0 and err[0].startswith("skipped a.wav")


def test_words_from_result():
    result = {"segments": [
        {"words": [{"text": " world,", "start": 0.9004, "end": 1.2},
                   {"text": "  ", "start": 1.3, "end": 1.4},  # no text: dropped
                   {"text": "late", "start": 2.9995, "end": 3.5},  # starts at the end: padding
                   {"text": "Hello", "start": -0.01, "end": 0.4996}]},
        {"text": "no words key"},
        {"words": [{"text": "tail", "start": 2.5, "end": 4.0},  # end clipped to the audio
                   {"text": "flat", "start": 1.5, "end": 1.49}]},  # end never before start
    ]}
    assert annotate.words_from_result(result, duration=3.0) == [
        Word("Hello", 0.0, 0.5), Word("world,", 0.9, 1.2), Word("flat", 1.5, 1.5), Word("tail", 2.5, 3.0)]
    assert annotate.words_from_result({"segments": []}, 3.0) == []


def test_model_channel_is_channel_zero(tmp_path, speech):
    _, wav = make_dataset(tmp_path, speech)
    audio = annotate.model_channel(wav)
    assert audio.dim() == 1 and abs(audio.shape[0] - speech.shape[1] * 2 / 3) <= 1  # 16 kHz
    assert audio.abs().max() > 0.1
    save_wav(wav, torch.cat([torch.zeros_like(speech), speech]), 24000)  # speech on the user's side
    assert annotate.model_channel(wav).abs().max() < 1e-3


def test_write_alignment_is_atomic(tmp_path, monkeypatch):
    wav = tmp_path / "a.wav"
    json_path = tmp_path / "a.json"
    json_path.write_text('{"alignments": [], "text_conditions": {"x": 1}}')

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(DataError, match="cannot write .*a.json: No space left"):
        annotate.write_alignment(wav, [Word("hi", 0.0, 0.5)])
    assert json_path.read_text() == '{"alignments": [], "text_conditions": {"x": 1}}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left
    monkeypatch.undo()
    annotate.write_alignment(wav, [Word("hi", 0.0, 0.5)])
    assert json.loads(json_path.read_text()) == {"alignments": [["hi", [0.0, 0.5], MAIN_SPEAKER]],
                                                 "text_conditions": {"x": 1}}


def spoil(case: str, folder, manifest, wav, whisper_pt) -> tuple[list, str]:
    """Break the dataset of `make_dataset` as `case` says: the arguments to run, and a part of the
    error message expected."""
    model = ["--model", whisper_pt]
    if case == "missing manifest":
        return [folder / "nope.jsonl", *model], "manifest"
    if case == "line not JSON":
        manifest.write_text("{oops\n")
        return [manifest, *model], "line 1: not JSON"
    if case == "missing wav":
        wav.unlink()
        return [manifest, *model], "does not exist"
    if case == "mono wav":
        save_wav(wav, load_audio(wav)[:1], 24000)
        return [manifest, *model], "is mono; fine-tuning audio must be stereo"
    if case == "missing model":
        return [manifest, "--model", "missing/whisper.pt"], "Whisper checkpoint missing/whisper.pt does not exist"
    if case == "not a model":
        (folder / "junk.pt").write_bytes(b"junk")
        return [manifest, "--model", folder / "junk.pt"], "is not a Whisper checkpoint"
    if case == "model name":
        return [manifest, "--model", "enormous"], "unknown Whisper model 'enormous'"
    if case == "language":
        return [manifest, *model, "--language", "klingon"], "unknown language 'klingon'"
    if case == "unwritable json":  # root writes anywhere: a folder in the way stands for it
        wav.with_suffix(".json").mkdir()
        return [manifest, *model, "--overwrite"], "cannot write"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing manifest", "line not JSON", "missing wav", "mono wav", "missing model",
                                  "not a model", "model name", "language", "unwritable json"])
def test_bad_input_is_one_line(tmp_path, capsys, whisper_pt, speech, case):
    folder = tmp_path / "data"
    manifest, wav = make_dataset(folder, speech)
    args, fragment = spoil(case, folder, manifest, wav, whisper_pt)
    code, err = run(capsys, *args, "--device", "cpu")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("openmoshi: error: ") and fragment in err[0], err
    assert not [p for p in folder.glob("*.json") if p.is_file()] + list(folder.glob(".*.tmp"))


def test_no_network_says_to_pass_a_local_checkpoint(tmp_path, capsys, monkeypatch, speech):
    manifest, _ = make_dataset(tmp_path / "data", speech)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, err = run(capsys, manifest, "--model", "tiny", "--device", "cpu")
    assert code == 2 and len(err) == 1, err
    assert "cannot fetch Whisper model 'tiny'" in err[0] and "--model PATH" in err[0]


def test_help_imports_no_asr():
    code = ("import sys; from openmoshi.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('whisper', 'whisper_timestamped', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert cli_annotate.DEFAULT_MODEL == annotate.DEFAULT_MODEL
