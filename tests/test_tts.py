"""Kyutai TTS: greedy generation equal to the official `TTSModel.generate` (moshi 0.2.13) on tiny
random checkpoints in the released layouts: text and audio tokens exact, word timings equal.
One speaker-embedding model (cross-attention, CFG distilled into a `cfg` condition, second text
stream) and one audio-prefix model (guidance by batch doubling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openmoshi.lm.tts import TTSSettings, condition_values, generate, tts_spec
from openmoshi.lm.tts_script import script_to_entries
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files

from tts_utils import make_tts_checkpoint, make_voice, official_tts

TURNS = [["Hello there, how are you?", "Fine <break time=\"0.4s\"/> thanks."],
         ["One two three four five six seven."]]


@pytest.fixture(scope="module")
def emb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tts_emb")
    make_tts_checkpoint(folder, "emb", seed=3)
    make_voice(folder / "voices", "alice", 1)
    make_voice(folder / "voices", "bob", 2)
    return folder


@pytest.fixture(scope="module")
def prefix_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tts_prefix")
    make_tts_checkpoint(folder, "prefix", seed=5)
    return folder


def chosen_timings(transcripts) -> bool:
    """Some word started before the state machine forced it (max_padding 8: 9 frames apart): the
    timings are the model's, not the rule's."""
    return any(b[1] - a[1] < 9 for t in transcripts for a, b in zip(t, t[1:]))


def ours(folder: Path):
    model = load_model(resolve_files(hf_repo=str(folder)), device="cpu", dtype=torch.float32)
    return model, tts_spec(model.config)


def official_run(tts, turns, voices=None, prefixes=None, cfg=None):
    from moshi.models.tts import TTSModel  # noqa: F401

    entries = [tts.prepare_script(t, padding_between=1) for t in turns]
    attrs = [tts.make_condition_attributes(v or [], cfg) for v in (voices or [None] * len(turns))]
    result = tts.generate(entries, attrs, prefixes=prefixes)
    return torch.cat(result.frames, dim=-1), result


def test_speaker_embeddings_match_official(emb_folder):
    tts = official_tts(emb_folder, temp=0.0, cfg_coef=1.0)
    voices = [[emb_folder / "voices" / f"alice.0badc0de@7.safetensors", emb_folder / "voices" / "bob.0badc0de@7.safetensors"],
              [emb_folder / "voices" / "bob.0badc0de@7.safetensors"]]
    ref, result = official_run(tts, TURNS, voices, cfg=2.0)

    model, spec = ours(emb_folder)
    from safetensors.torch import load_file
    assert spec.delay_steps == 4 and spec.second_stream_ahead == 2 and spec.multi_speaker and spec.cfg_values
    entries = [script_to_entries(model.tokenizer, t, 12.5, spec.multi_speaker, padding_between=1) for t in TURNS]
    values = [condition_values(spec, [load_file(str(p))["speaker_wavs"][0] for p in v], 2.0) for v in voices]
    out = generate(model.lm, spec, TTSSettings(temp=0.0, cfg_coef=2.0), entries, values)
    assert out.frames.shape == ref.shape
    assert (ref[:, 1:] >= 0).any() and len(set(ref[:, 1:].flatten().tolist())) > 10, "degenerate test"
    assert torch.equal(out.frames, ref)
    assert out.end_steps == result.end_steps and None not in out.end_steps
    assert out.transcripts == [[tuple(w) for w in t] for t in result.all_transcripts]
    assert chosen_timings(out.transcripts), "degenerate test: every word was forced"
    assert out.consumption_times == result.all_consumption_times
    assert chosen_timings(out.transcripts), "degenerate test: every word was forced"


def test_audio_prefix_matches_official(prefix_folder):
    tts = official_tts(prefix_folder, temp=0.0, cfg_coef=2.0)
    torch.manual_seed(0)
    prefixes = [torch.randint(0, 2048, (5, 7)), torch.randint(0, 2048, (5, 9))]
    for p in prefixes:
        p[0] = -1  # the text row of an official prefix
    ref, result = official_run(tts, TURNS, prefixes=prefixes)

    model, spec = ours(prefix_folder)
    assert not spec.multi_speaker and not spec.cfg_values
    entries = [script_to_entries(model.tokenizer, t, 12.5, spec.multi_speaker, padding_between=1) for t in TURNS]
    values = [condition_values(spec) for _ in TURNS]
    out = generate(model.lm, spec, TTSSettings(temp=0.0, cfg_coef=2.0), entries, values, prefixes=[p[1:] for p in prefixes])
    assert len(set(ref[:, 1:].flatten().tolist())) > 10, "degenerate test"
    for b, p in enumerate(prefixes):  # the prefix is in the audio, delayed
        assert torch.equal(ref[b, 1, spec.delay_steps:spec.delay_steps + p.shape[1]], p[1])
    assert torch.equal(out.frames, ref)
    assert out.end_steps == result.end_steps and None not in out.end_steps
    assert out.transcripts == [[tuple(w) for w in t] for t in result.all_transcripts]
    assert chosen_timings(out.transcripts), "degenerate test: every word was forced"


def test_sampling_matches_official_with_the_same_seed(emb_folder):
    """temp 0.6 (moshi-tts's), top-k 250/25: the official sampler's draws from the global generator."""
    from safetensors.torch import load_file

    voices = [[emb_folder / "voices" / "alice.0badc0de@7.safetensors"], [emb_folder / "voices" / "bob.0badc0de@7.safetensors"]]
    tts = official_tts(emb_folder, temp=0.6, cfg_coef=1.0)
    torch.manual_seed(1234)
    ref, result = official_run(tts, TURNS, voices, cfg=3.0)
    model, spec = ours(emb_folder)
    entries = [script_to_entries(model.tokenizer, t, 12.5, spec.multi_speaker, padding_between=1) for t in TURNS]
    values = [condition_values(spec, [load_file(str(p))["speaker_wavs"][0] for p in v], 3.0) for v in voices]
    torch.manual_seed(1234)
    out = generate(model.lm, spec, TTSSettings(temp=0.6), entries, values)
    assert torch.equal(out.frames, ref)
    assert out.transcripts == [[tuple(w) for w in t] for t in result.all_transcripts]


def test_streams_joining_and_leaving_equal_their_solo_runs(emb_folder):
    """The server's way: slots start at different steps, wait (inactive) and leave; each stream's
    frames equal those of the stream generated alone."""
    from safetensors.torch import load_file

    from openmoshi.lm.tts import finished, init_tts_state, move_slot, start_slot, tts_step

    model, spec = ours(emb_folder)
    lm, settings = model.lm, TTSSettings(temp=0.0, cfg_coef=2.0)
    voice = {n: load_file(str(emb_folder / "voices" / f"{n}.0badc0de@7.safetensors"))["speaker_wavs"][0] for n in ("alice", "bob")}
    streams = [(["Hello there, how are you?"], ["alice"]), (["One two three."], ["bob"]), (["Fine thanks.", "Good."], ["bob", "alice"])]
    entries = [script_to_entries(model.tokenizer, t, 12.5, True, padding_between=1) for t, _ in streams]
    values = [condition_values(spec, [voice[n] for n in names], 2.0) for _, names in streams]
    solo = [generate(lm, spec, settings, [e], [v]).frames[0] for e, v in zip(entries, values)]

    state = init_tts_state(lm, spec, settings, batch_size=2, cross_len=values[0]["speaker_wavs"].tensor.shape[0])
    got = {0: [], 1: [], 2: []}
    slot_of, moves = {}, 0  # stream -> slot
    queue = [(0, 0), (1, 3), (2, None)]  # (stream, step at which it joins; None: when a slot frees)
    for step in range(400):
        for stream, at in list(queue):
            free = [s for s in range(2) if s not in slot_of.values()]
            if free and (at == step or (at is None and step > 3)):
                slot_of[stream] = free[0]
                start_slot(lm, spec, state, free[0], entries[stream], values[stream])
                queue.remove((stream, at))
        active = [s in slot_of.values() and step % 7 != 5 for s in range(2)]  # and a pause now and then
        out = tts_step(lm, spec, state, active=active)
        for stream, s in list(slot_of.items()):
            if active[s] and out.valid[s]:
                got[stream].append(out.frame[s].clone())
            if finished(spec, state, s):
                del slot_of[stream]
        for stream, s in list(slot_of.items()):  # pack the streams into the first slots
            if s == 1 and 0 not in slot_of.values():
                move_slot(state, 1, 0)
                slot_of[stream], moves = 0, moves + 1
        if not queue and not slot_of:
            break
    assert moves > 0
    for stream in range(3):
        assert torch.equal(torch.stack(got[stream], dim=-1), solo[stream]), f"stream {stream}"


def test_words_streamed_one_by_one_say_what_the_whole_text_says(emb_folder):
    """A client sends its text word by word (moshi-server's /api/tts_streaming): the slot steps only
    when `ready`, and says exactly what the whole text given at once says."""
    from safetensors.torch import load_file

    from openmoshi.lm.tts import finished, init_tts_state, ready, start_slot, tts_step

    model, spec = ours(emb_folder)
    lm, settings = model.lm, TTSSettings(temp=0.0, cfg_coef=2.0)
    voice = load_file(str(emb_folder / "voices" / "alice.0badc0de@7.safetensors"))["speaker_wavs"][0]
    text = "Hello there, <break time=\"0.3s\"/> how are you today my friend?"
    values = condition_values(spec, [voice], 2.0)
    whole = generate(lm, spec, settings, [script_to_entries(model.tokenizer, [text], 12.5, True, 1)], [values])

    state = init_tts_state(lm, spec, settings, batch_size=1, cross_len=values["speaker_wavs"].tensor.shape[0])
    start_slot(lm, spec, state, 0, [], values)
    chunks, frames, waits = text.replace("<break time", "<break_time").split(), [], 0
    for step in range(300):
        if not ready(state, 0, text_complete=not chunks):
            waits += 1  # the client's next word arrives: one per wait
            chunk = chunks.pop(0).replace("<break_time", "<break time")
            first = not state.scripts[0].entries and not state.scripts[0].consumption_times
            state.scripts[0].entries.extend(script_to_entries(model.tokenizer, [chunk], 12.5, first, 1))
            continue
        out = tts_step(lm, spec, state)
        if out.valid[0]:
            frames.append(out.frame[0].clone())
        if finished(spec, state, 0):
            break
    assert waits > 3
    assert torch.equal(torch.stack(frames, dim=-1), whole.frames[0])
    assert state.scripts[0].transcript == whole.transcripts[0]


def test_voices_of_different_lengths_in_one_batch_match_official(emb_folder):
    """The official collation pads a shorter speaker condition with masked positions (learnt
    padding) to the batch's longest; so does ours."""
    from safetensors.torch import load_file

    long_voice = make_voice(emb_folder / "voices", "carol", 3, frames=9)
    voices = [[emb_folder / "voices" / "alice.0badc0de@7.safetensors"], [long_voice]]
    tts = official_tts(emb_folder, temp=0.0, cfg_coef=1.0)
    ref, result = official_run(tts, TURNS, voices, cfg=2.0)
    model, spec = ours(emb_folder)
    entries = [script_to_entries(model.tokenizer, t, 12.5, spec.multi_speaker, padding_between=1) for t in TURNS]
    values = [condition_values(spec, [load_file(str(p))["speaker_wavs"][0] for p in v], 2.0) for v in voices]
    out = generate(model.lm, spec, TTSSettings(temp=0.0), entries, values)
    assert torch.equal(out.frames, ref)
    assert out.transcripts == [[tuple(w) for w in t] for t in result.all_transcripts]
