"""The fine-tuning data pipeline, step by step: manifest and alignments, the text stream on the
frame grid, the Mimi codes cache, segments and their order."""

from __future__ import annotations

import json
import os

import pytest
import torch

from openmoshi.audio import SAMPLE_RATE, save_wav
from openmoshi.lm.config import TEXT_END_PADDING_ID as EOP
from openmoshi.lm.config import TEXT_PADDING_ID as PAD
from openmoshi.lm.config import ZERO_TOKEN as ZERO
from openmoshi.training.codes_cache import CodesCache, fingerprint
from openmoshi.training.manifest import DataError, read_alignments, read_manifest
from openmoshi.training.segments import SegmentData, Conversation, batch_indices, plan_segments
from openmoshi.training.text_stream import text_stream

F = 0.08  # seconds per frame


# ----------------------------------------------------------------------------- text stream


def test_words_on_the_grid_with_end_of_padding():
    # "ab" (2 tokens) at 0.2 s -> frame 2; "c" at 0.5 s -> frame 6.
    assert text_stream([(0.2, [10, 11]), (0.5, [12])], 0.0, 10) == [PAD, EOP, 10, 11, PAD, EOP, 12, PAD, PAD, PAD]


def test_word_at_time_zero_has_no_end_of_padding_before_it():
    assert text_stream([(0.0, [10, 11])], 0.0, 4) == [10, 11, PAD, PAD]


def test_words_back_to_back():
    # The second word starts right where the first one's tokens end: no padding, so no EOP.
    assert text_stream([(0.16, [10, 11]), (0.32, [12])], 0.0, 6) == [PAD, EOP, 10, 11, 12, PAD]


def test_overlapping_words_follow_each_other_instead_of_being_cut():
    # "c" starts at frame 3 while "ab" still has tokens: its tokens follow (moshi-finetune drops "b").
    assert text_stream([(0.16, [10, 11, 13]), (0.24, [12])], 0.0, 7) == [PAD, EOP, 10, 11, 13, 12, PAD]


def test_frame_boundaries_use_floor():
    # 0.0799 s is in frame 0, 0.08 s in frame 1 (exactly, despite 0.08 * 12.5 in floating point).
    assert text_stream([(0.0799, [10])], 0.0, 3) == [10, PAD, PAD]
    assert text_stream([(0.08, [10])], 0.0, 3) == [EOP, 10, PAD]
    assert text_stream([(1.04, [10])], 1.0, 3) == [10, PAD, PAD]  # relative to the segment start


def test_words_past_the_end_are_cut_and_outside_words_dropped():
    words = [(-0.5, [1]), (0.9, [5]), (1.2, [10, 11, 12, 13]), (1.5, [20])]  # segment 1.0 .. 1.4 s
    assert text_stream(words, 1.0, 5) == [PAD, EOP, 10, 11, 12]


def test_short_segment_is_padded_with_the_zero_token():
    assert text_stream([(0.08, [10])], 0.0, 6, audio_frames=3) == [EOP, 10, PAD, ZERO, ZERO, ZERO]
    # A word that would start after the audio ends is not placed.
    assert text_stream([(0.4, [10])], 0.0, 6, audio_frames=3) == [PAD, PAD, PAD, ZERO, ZERO, ZERO]


# ----------------------------------------------------------------------------- manifest and alignments


def _stereo(path, seconds=1.0, channels=2):
    pcm = 0.1 * torch.randn(channels, int(seconds * SAMPLE_RATE))
    save_wav(path, pcm, SAMPLE_RATE)
    return path


def _manifest(tmp_path, lines):
    m = tmp_path / "data.jsonl"
    m.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return m


def test_manifest_paths_are_relative_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    _stereo(tmp_path / "sub" / "a.wav")
    entries = read_manifest(_manifest(tmp_path, [{"path": "sub/a.wav", "duration": 1.0}, ""]))
    assert [e.path for e in entries] == [(tmp_path / "sub" / "a.wav").resolve()] and entries[0].duration == 1.0


@pytest.mark.parametrize("line,message", [
    ("not json", "line 1: not JSON"),
    ({"duration": 1.0}, 'expected {"path"'),
    ({"path": "a.wav", "duration": -1}, "'duration' must be a positive number"),
    ({"path": "a.wav", "duration": "long"}, "'duration' must be a positive number"),
    ({"path": "missing.wav", "duration": 1.0}, "missing.wav does not exist"),
])
def test_bad_manifest_lines(tmp_path, line, message):
    _stereo(tmp_path / "a.wav")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("{", r"\{")):
        read_manifest(_manifest(tmp_path, [line]))


def test_missing_and_empty_manifests(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="lists no audio files"):
        read_manifest(_manifest(tmp_path, [""]))


def test_alignments_keep_the_main_speaker_sorted(tmp_path):
    wav = tmp_path / "a.wav"
    (tmp_path / "a.json").write_text(json.dumps({"alignments": [
        ["world", [0.6, 0.9], "SPEAKER_MAIN"], ["hi", [0.1, 0.3], "SPEAKER_MAIN"],
        ["user", [0.2, 0.4], "SPEAKER_OTHER"], ["zero", [0.5, 0.5], "SPEAKER_MAIN"]],
        "text_conditions": {"description": "very_good"}}))
    a = read_alignments(wav, 1.0)
    assert [(w.text, w.start) for w in a.words] == [("hi", 0.1), ("world", 0.6)]
    assert a.text_conditions == {"description": "very_good"}


@pytest.mark.parametrize("content,message", [
    (None, "no alignment file"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"words": []}), 'expected {"alignments"'),
    (json.dumps({"alignments": [["hi", [0.1], "SPEAKER_MAIN"]]}), "alignment 0 is"),
    (json.dumps({"alignments": [["late", [2.5, 2.7], "SPEAKER_MAIN"]]}), "outside the audio"),
])
def test_bad_alignments(tmp_path, content, message):
    if content is not None:
        (tmp_path / "a.json").write_text(content)
    with pytest.raises(DataError, match=message.replace("{", r"\{")):
        read_alignments(tmp_path / "a.wav", 2.0)


# ----------------------------------------------------------------------------- codes cache


@pytest.fixture(scope="module")
def mimi_file():
    from infer_utils import _mimi

    return _mimi(0)


def test_cache_holds_each_channels_whole_signal_codes(tmp_path, mimi_file):
    from openmoshi.loading.mimi import load_mimi

    mimi = load_mimi(mimi_file, num_codebooks=8)
    wav = _stereo(tmp_path / "a.wav", seconds=1.03)  # not a whole number of frames
    entries = read_manifest(_manifest(tmp_path, [{"path": "a.wav", "duration": 1.03}]))
    cache = CodesCache(tmp_path / "cache", fingerprint(mimi_file), 8)
    assert cache.stale(entries) == entries
    cache.encode(entries, mimi)
    cache.merge(1)
    assert cache.stale(entries) == []
    cached = cache.get(cache.index(), wav.resolve())
    assert cached.samples == int(1.03 * SAMPLE_RATE) and cached.frames == 13
    codes = cache.read(cached)
    from openmoshi.audio import load_audio

    pcm = load_audio(wav, mono=False)
    with torch.no_grad():
        ref = mimi.encode(pcm[:, None])  # [2, 8, 13]: whole-signal (non-streaming) reference
    assert torch.equal(codes, ref.reshape(16, -1))
    # A changed wav is encoded again.
    os.utime(wav, ns=(1, 1))
    assert cache.stale(entries) == entries


def test_cache_refuses_mono(tmp_path, mimi_file):
    from openmoshi.loading.mimi import load_mimi

    _stereo(tmp_path / "m.wav", channels=1)
    entries = read_manifest(_manifest(tmp_path, [{"path": "m.wav", "duration": 1.0}]))
    with pytest.raises(DataError, match="1 channel.*needs stereo"):
        CodesCache(tmp_path / "cache", "x", 8).encode(entries, load_mimi(mimi_file, num_codebooks=8))


# ----------------------------------------------------------------------------- segments


def test_segments_cover_each_conversation_from_its_start():
    segs = plan_segments([25, 10], 10)
    assert [(s.conversation, s.start, s.length) for s in segs] == [(0, 0, 10), (0, 10, 10), (0, 20, 5), (1, 0, 10)]


def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, size = 7, 3
    stream = [i for step in range(7) for i in batch_indices(step, n, size, seed=5)]  # 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))  # every segment once per epoch
    assert stream[:n] != stream[n:2 * n]  # reshuffled
    assert batch_indices(4, n, size, seed=5) == stream[12:15]  # resumable: no state
    assert batch_indices(0, n, size, seed=6) != batch_indices(0, n, size, seed=5)


def test_example_layout(tmp_path):
    class FakeCache:
        def read(self, cached):
            return torch.arange(4 * 5).view(4, 5)  # K = 2 per channel, 5 frames

    conv = Conversation(cached=type("C", (), {"frames": 5})(), words=[(0.08, [42])])
    data = SegmentData(FakeCache(), [conv], segment_frames=3, model_codebooks=2, user_codebooks=2)
    assert [(s.start, s.length) for s in data.segments] == [(0, 3), (3, 2)]
    first, second = data.example(0), data.example(1)
    assert first.tolist() == [[EOP, 42, PAD], [0, 1, 2], [5, 6, 7], [10, 11, 12], [15, 16, 17]]
    assert second.tolist() == [[PAD, PAD, ZERO], [3, 4, ZERO], [8, 9, ZERO], [13, 14, ZERO], [18, 19, ZERO]]
