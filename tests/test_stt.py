"""Kyutai STT: pause probabilities, words and timings against the official package (random weights)."""

from __future__ import annotations

import pytest
import torch

from official_utils import speech
from stt_utils import official_stt, make_stt

from openmoshi.engine.engine import Engine
from openmoshi.engine.speed import SpeedConfig, choose
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files


@pytest.fixture(scope="module")
def stt_folder(tmp_path_factory):
    return make_stt(tmp_path_factory.mktemp("stt") / "ckpt", seed=3)


def _load(folder):
    return load_model(resolve_files(str(folder)), "cpu", torch.float32)


def test_extra_heads_match_official_step_with_extra_heads(stt_folder):
    """Text tokens exact and the extra heads' probabilities within 1e-5 of the official
    `LMGen.step_with_extra_heads`, step by step, for a batch of two different inputs."""
    model = _load(stt_folder)
    pcm = torch.stack([speech(1.6), speech(2.0)[-1920 * 20:]])  # [2, N], 20 frames each
    ref_tokens, ref_prs = official_stt(stt_folder, pcm)
    engine = Engine.build(model, 2, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                          SamplingConfig.greedy(), all_buckets=False)
    codes = [engine.encode(pcm[:, None, f * 1920:(f + 1) * 1920]).clone() for f in range(20)]
    tokens, prs = [[], []], []
    for c in [codes[0]] + codes:
        out = engine.step(c[:, :, 0])
        for b in range(2):
            tokens[b].append(int(out.text[b]))
        prs.append(out.prs.clone())
    assert tokens == ref_tokens
    assert {0, 3} <= set(tokens[0]) and len(set(tokens[0]) - {0, 3}) > 2  # words, pauses and word ends
    assert prs[0].shape == (2, 4, 6)
    torch.testing.assert_close(torch.stack(prs), torch.stack(ref_prs), atol=1e-5, rtol=0)


def test_models_without_extra_heads_return_no_probabilities():
    from lm_utils import tiny_lm
    from openmoshi.lm import generate as G

    lm = tiny_lm()
    state = G.init_state(lm, 1, SamplingConfig.greedy())
    assert G.step(lm, state, torch.zeros(1, 8, dtype=torch.long)).prs is None


# ----------------------------------------------------------------------------- words


def test_word_tracker_follows_moshi_server():
    """moshi-server's rule (asr.rs): pieces between paddings make a word, told when the next padding
    comes, starting at the last end of padding; an end of padding ends the word told before it."""
    from openmoshi.lm.stt import EndWord, SttTiming, WordEvent, WordTracker

    t = WordTracker(SttTiming(delay_tokens=2))
    PAD, EPAD = 3, 0
    steps = [7, PAD, EPAD, 10, 11, PAD, PAD, EPAD, 12, EPAD, 13]
    events = [t.push(x) for x in steps]
    # step counts 1..11; tokens before the delay (steps 1) are not read
    assert events[0] == []  # 7 at step 1 < delay 2
    assert events[1] == []  # a pad with no word
    assert events[2] == []  # end of padding at step 3: boundary at (3 - 2) / 12.5 = 0.08
    assert events[5] == [WordEvent((10, 11), 0.08)]
    assert events[7] == [EndWord(round(6 / 12.5, 3))]  # step 8
    assert events[9] == [WordEvent((12,), 0.48), EndWord(0.64)]  # told and ended by the same end of padding
    assert events[10] == []  # 13 stays open: never told


def _stream_pcm(pcm: torch.Tensor, prefix: int, tail: int) -> torch.Tensor:
    """What the official loop is fed for one input: silence prefix, the input padded to whole
    frames, silence tail ([1, N] -> [1, M])."""
    whole = -(-pcm.shape[-1] // 1920) * 1920
    return torch.nn.functional.pad(pcm, (prefix * 1920, whole - pcm.shape[-1] + tail * 1920))


def _official_words(folder, pcm, timing, tokenizer):
    from openmoshi.lm.stt import WordTracker, timed_words

    tokens, prs = official_stt(folder, pcm)
    t = WordTracker(timing)
    events = [e for tok in tokens[0] for e in t.push(tok)]
    return tokens[0], [p[0, :, 0].tolist() for p in prs], timed_words(events, tokenizer.decode)


def test_stt_command_matches_official_loop(stt_folder, tmp_path, capsys):
    """`openmoshi stt a.wav b.wav --json --prs`: per input (one batch), the words, text tokens and
    pause probabilities of the official LMGen loop over that input's stream."""
    import json

    from openmoshi.audio import load_audio, save_wav
    from openmoshi.cli.main import main
    from openmoshi.inference.stt import tail_frames, transcribe
    from openmoshi.lm.stt import SttTiming

    model = _load(stt_folder)
    timing = SttTiming.of(model.config)
    assert timing == SttTiming(6, 0)
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    save_wav(paths[0], speech(1.5)[None])
    save_wav(paths[1], speech(2.3)[-24000:][None])  # shorter: its row reads silence past its end
    assert main(["stt", *map(str, paths), "--json", "--prs", "--hf-repo", str(stt_folder), "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    for path, got in zip(paths, data):
        pcm = load_audio(path)
        tokens, prs, words = _official_words(stt_folder, _stream_pcm(pcm, 0, tail_frames(timing)), timing,
                                             model.tokenizer)
        assert [(w["text"], w["start"], w["stop"]) for w in got["words"]] == [(w.text, w.start, w.stop) for w in words]
        assert len(words) >= 2 and got["text"] == " ".join(w.text for w in words)
        assert len(got["prs"]) == len(tokens)
        torch.testing.assert_close(torch.tensor([p["prs"] for p in got["prs"]]), torch.tensor(prs),
                                   atol=2e-6, rtol=0)
    solo = transcribe(model, [str(paths[1])])[0]
    assert [asdict_(w) for w in solo.words] == data[1]["words"]


def asdict_(w):
    from dataclasses import asdict

    return asdict(w)


def test_stt_prefix_and_delay_shift_times(tmp_path):
    """A silence prefix (stt-2.6b has 1 s) is fed first and not counted in the times."""
    from openmoshi.inference.stt import tail_frames, transcribe
    from openmoshi.lm.stt import SttTiming

    folder = make_stt(tmp_path / "p", seed=4, stt_config={"audio_delay_seconds": 0.3,
                                                          "audio_silence_prefix_seconds": 0.4})
    model = _load(folder)
    timing = SttTiming.of(model.config)
    assert timing == SttTiming(4, 5)
    pcm = speech(1.2)[None]
    got = transcribe(model, [pcm])[0]
    tokens, _, words = _official_words(folder, _stream_pcm(pcm, 5, tail_frames(timing)), timing, model.tokenizer)
    assert got.tokens == tokens and got.words == words and words
    assert all(w.start >= 0 for w in words)


def test_stt_command_errors(stt_folder, tmp_path, capsys):
    from infer_utils import make_checkpoint
    from openmoshi.audio import save_wav
    from openmoshi.cli.main import main

    wav = tmp_path / "x.wav"
    save_wav(wav, speech(0.3)[None])
    moshi = tmp_path / "moshi"
    make_checkpoint(moshi, "moshi", small_mimi=True)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for argv, message in (([str(tmp_path / "missing.wav")], "does not exist"),
                          ([str(wav), "--hf-repo", str(moshi)], "not speech to text"),
                          ([str(empty)], "empty")):
        with pytest.raises(SystemExit) as e:
            main(["stt", *argv, *([] if "--hf-repo" in argv else ["--hf-repo", str(stt_folder)])])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_mimi_encode_with_idle_slots(stt_folder):
    """`encode_step(..., active)`: a slot that sits steps out keeps its state, so its codes on the
    steps it takes part in are those of its frames encoded alone (what STT streams need)."""
    mimi = _load(stt_folder).mimi
    frames = speech(2.0).view(-1, 1920)[:12]  # [12, F]
    solo_state = mimi.init_encode_state(1)
    solo = [mimi.encode_step(f[None, None], solo_state) for f in frames[:6]]
    state = mimi.init_encode_state(2)
    pattern = [1, 0, 0, 1, 1, 0, 1, 0, 1, 1]  # slot 1 takes part in 6 of 10 steps
    got, i = [], 0
    for t, on in enumerate(pattern):
        pcm = torch.stack([frames[t], frames[i] if on else torch.randn(1920)])[:, None]
        codes = mimi.encode_step(pcm, state, torch.tensor([True, bool(on)]))
        if on:
            got.append(codes[1:])
            i += 1
    assert all(torch.equal(a, b) for a, b in zip(got, solo))
