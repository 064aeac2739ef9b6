"""The PersonaPlex prompt phase (issue 13): frames of forced tokens, checked frame by frame on what
the model reads, on a random dep_q = 16 checkpoint in PersonaPlex's layout made here; voice
presets replayed; voices from files and folders; `openmoshi infer --text-prompt --voice-prompt`."""

from __future__ import annotations

import math

import pytest
import torch

from infer_utils import MOSHI, make_checkpoint
from openmoshi.audio import SAMPLE_RATE, save_wav
from openmoshi.lm import generate as G
from openmoshi.lm.config import TEXT_PADDING_ID
from openmoshi.lm.persona import (SILENCE_CODES, SINE_CODES, SPACER_FRAMES, Preset, PromptError, build_prompt,
                                  run_prompts, wrap_system)
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.loading.voices import VoiceError, list_voices, load_voice, normalize_loudness, resolve_voice

PERSONAPLEX = dict(MOSHI, dep_q=16, context=200)  # card 2048, so that the silence and sine codes exist


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personaplex") / "repo"
    make_checkpoint(folder, "moshi", seed=3, lm_kwargs=PERSONAPLEX)
    m = load_model(resolve_files(str(folder)), device="cpu", dtype="float32")
    assert m.lm.cfg.depformer_user_slots == 8 and m.mimi.num_codebooks == 8
    return m


def reading(lm):
    """Records the tokens the temporal transformer reads at each step ([B, K] per step)."""
    seen = []
    forward = lm.forward_text

    def spy(tokens, *args, **kwargs):
        seen.append(tokens[:, :, 0].clone())
        return forward(tokens, *args, **kwargs)

    lm.forward_text = spy
    return seen


def expected_frames(voice: torch.Tensor | None, text: list[int]):
    """(text [N], model [N, 8]) of the prompt, written out phase by phase."""
    rows = []
    for codes in (voice if voice is not None else []):
        rows.append((TEXT_PADDING_ID, codes.tolist()))
    rows += [(TEXT_PADDING_ID, list(SILENCE_CODES))] * SPACER_FRAMES
    rows += [(t, list(SILENCE_CODES)) for t in text]
    rows += [(TEXT_PADDING_ID, list(SILENCE_CODES))] * SPACER_FRAMES
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def test_wrap_system():
    assert wrap_system("  You are Ada. ") == "<system> You are Ada. <system>"
    assert wrap_system("<system> Hi <system>") == "<system> Hi <system>"
    with pytest.raises(PromptError, match="empty"):
        wrap_system("   ")


def test_prompt_phase_streams_frame_by_frame(model):
    """Two slots with different prompts (a voice and a text; a text alone) run together: at every
    step, each stream the model reads holds its prompt frame (delayed streams the frame before),
    the user's side the sine codes, and what the steps return is the prompt's frames; after the
    prompt, the conversation reads the user's codes and samples."""
    lm, cfg = model.lm, model.lm.cfg
    g = torch.Generator().manual_seed(5)
    voice = torch.randint(0, 2048, (5, 8), generator=g)
    texts = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27]]
    prompts = [build_prompt(cfg, voice, texts[0]), build_prompt(cfg, None, texts[1])]
    assert [p.frames for p in prompts] == [5 + 6 + 3 + 6, 6 + 7 + 6]
    for p, v, t in zip(prompts, (voice, None), texts):
        text, audio = expected_frames(v, t)
        assert torch.equal(p.text, text) and torch.equal(p.model, audio)
        assert (p.user == torch.tensor(SINE_CODES)).all()
    state = G.init_state(lm, 2, SamplingConfig(temp=0.8, temp_text=0.7))
    seen = reading(lm)
    run_prompts(lm, state, prompts, torch.Generator().manual_seed(6))
    assert state.offset.tolist() == [20, 19]
    delayed = torch.tensor(cfg.delays) > 0
    for b, p in enumerate(prompts):
        for s in range(2, p.frames):  # steps 0 and 1 read initial tokens in the delayed streams
            tokens = seen[s][b]
            now = torch.cat([p.text[s:s + 1], p.model[s], p.user[s]])
            before = torch.cat([p.text[s - 1:s], p.model[s - 1], p.user[s - 1]])
            assert torch.equal(tokens, torch.where(delayed, before, now)), (b, s)
    # The conversation's first step reads the frame the last prompt step sampled freely (its
    # delayed streams still the last spacer frame) and the user's codes.
    user = torch.randint(0, 2048, (2, 8), generator=g)
    out = G.step(lm, state, user, generator=torch.Generator().manual_seed(7))
    assert torch.equal(seen[-1][:, 2:9], torch.tensor(SILENCE_CODES[1:]).expand(2, 7))
    assert torch.equal(seen[-1][:, 9], user[:, 0])
    assert torch.equal(seen[-1][:, 10:], torch.tensor(SINE_CODES[1:]).expand(2, 7))
    assert out.valid.all()
    del lm.forward_text


def _live_voice_as_preset(lm, voice: torch.Tensor, path) -> None:
    """Writes the `.pt` PersonaPlex's server saves after a live voice prompt: the input embeddings
    of its steps and its token ring (max_delay + 3 positions) after the voice's F frames."""
    cfg = lm.cfg
    F = voice.shape[0]
    state = G.init_state(lm, 1, SamplingConfig.greedy())
    seen = reading(lm)
    run_prompts(lm, state, [build_prompt(cfg, voice, [], spacer=0)])
    del lm.forward_text
    embeddings = torch.stack([lm.embed(t[:, :, None])[:, 0] for t in seen[:F - 1]])  # [F - 1, 1, D]
    R = cfg.max_delay + 3
    ring = torch.full((cfg.num_codebooks, R), -2)
    frame = lambda f: torch.cat([torch.tensor([TEXT_PADDING_ID]), voice[f], torch.tensor(SINE_CODES)])  # noqa: E731
    for p in range(F - 3, F + 1):
        for k, d in enumerate(cfg.delays):
            if 0 <= p - d < F:
                ring[k, p % R] = frame(p - d)[k]
    torch.save({"embeddings": embeddings[:, :, None], "cache": ring[None]}, path)


def test_preset_replay_equals_the_live_voice_prompt(model, tmp_path):
    """A voice preset (embeddings and token cache, as PersonaPlex saves them) gives the conversation
    a live voice prompt gives: the same tokens, frame by frame."""
    lm, cfg = model.lm, model.lm.cfg
    g = torch.Generator().manual_seed(8)
    voice = torch.randint(0, 2048, (7, 8), generator=g)
    _live_voice_as_preset(lm, voice, tmp_path / "v.pt")
    preset = load_voice(tmp_path / "v.pt", model.mimi, cfg)
    assert isinstance(preset, Preset) and preset.frames == 7
    user = torch.randint(0, 2048, (12, 8), generator=g)
    outs = []
    for voice_prompt in (voice, preset):
        state = G.init_state(lm, 1, SamplingConfig.greedy())
        run_prompts(lm, state, [build_prompt(cfg, voice_prompt, [31, 32])])
        frames = [G.step(lm, state, user[t:t + 1]) for t in range(12)]
        outs.append(torch.stack([torch.cat([o.text, o.audio[0]]) for o in frames]))
    assert torch.equal(outs[0], outs[1])
    # Not trivially: a preset whose cache is off by one frame gives another conversation.
    shifted = Preset(preset.embeddings, preset.cache.roll(1, dims=1))
    state = G.init_state(lm, 1, SamplingConfig.greedy())
    run_prompts(lm, state, [build_prompt(cfg, shifted, [31, 32])])
    other = torch.stack([torch.cat([o.text, o.audio[0]]) for o in (G.step(lm, state, user[t:t + 1]) for t in range(12))])
    assert not torch.equal(other, outs[0])


def test_voice_files_and_folder(model, tmp_path):
    cfg = model.lm.cfg
    t = torch.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.05 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t)))[None]
    save_wav(tmp_path / "ada.wav", pcm, SAMPLE_RATE)
    louder = normalize_loudness(pcm)
    import pyloudnorm

    assert abs(pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(louder[0].double().numpy()) + 24) < 0.01
    codes = load_voice(tmp_path / "ada.wav", model.mimi, cfg)
    assert codes.shape == (19, 8)  # 1.5 s: 18.75 frames, the last padded
    with torch.no_grad():
        ref = model.mimi.encode(torch.nn.functional.pad(louder, (0, 19 * 1920 - louder.shape[-1]))[None])
    assert torch.equal(codes, ref[0].T)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"embeddings": torch.zeros(3, 1, 1, 7), "cache": torch.zeros(1, 17, 4, dtype=torch.long)},
               tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "notes.txt").write_text("x")
    assert list_voices(tmp_path) == ["ada.wav", "junk.pt", "list.pt", "other.pt"]
    with pytest.raises(VoiceError, match="unknown voice 'bob.wav'; the voices are: ada.wav"):
        resolve_voice(tmp_path, "bob.wav")
    with pytest.raises(VoiceError, match="unknown voice"):
        resolve_voice(tmp_path, "../ada.wav")
    with pytest.raises(VoiceError, match="not a PersonaPlex preset"):
        load_voice(tmp_path / "list.pt", model.mimi, cfg)
    with pytest.raises(VoiceError, match="junk.pt cannot be read as a tensor file"):
        load_voice(tmp_path / "junk.pt", model.mimi, cfg)
    with pytest.raises(VoiceError, match="another model"):
        load_voice(tmp_path / "other.pt", model.mimi, cfg)
    save_wav(tmp_path / "quiet.wav", torch.zeros(1, SAMPLE_RATE), SAMPLE_RATE)
    with pytest.raises(VoiceError, match="quiet.wav: the voice prompt is silent"):
        load_voice(tmp_path / "quiet.wav", model.mimi, cfg)


def test_bad_prompts(model):
    cfg = model.lm.cfg
    with pytest.raises(PromptError, match="more than the 100 the context window leaves"):
        build_prompt(cfg, None, [5] * 90)  # context 200: half of it for the prompt
    with pytest.raises(PromptError, match="tokens must be in"):
        build_prompt(cfg, None, [100])
    with pytest.raises(ValueError, match="voice codes"):
        build_prompt(cfg, torch.full((3, 8), 4000), [])


def test_cli_infer_with_a_persona(model, tmp_path, capsys):
    """`openmoshi infer --text-prompt --voice-prompt`: the conversation after the prompt phase,
    one output frame per input frame, the same as the Python API's; bad prompts are one line."""
    from official_utils import speech

    from openmoshi.cli.main import main
    from openmoshi.inference.offline import persona_prompt, run

    folder = str(model.files.hf_repo)
    wav, voice = tmp_path / "in.wav", tmp_path / "ada.wav"
    save_wav(wav, speech(1.0)[None], SAMPLE_RATE)
    save_wav(voice, speech(0.8)[None], SAMPLE_RATE)
    args = ["infer", str(wav), "--greedy", "--hf-repo", folder, "-q", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "-o", str(tmp_path / "out.wav"), "--text-prompt", "You are Ada.",
                 "--voice-prompt", str(voice), "--transcript", str(tmp_path / "t.json")]) == 0
    import json

    words = json.loads((tmp_path / "t.json").read_text())
    ref = run(model, [str(wav)], SamplingConfig.greedy(), prompt=persona_prompt(model, "You are Ada.", voice),
              cuda_graph=False)[0]
    assert ref.audio.shape[-1] == 12 * 1920  # 1 s: 12 whole frames in, 12 out
    assert words["text"] == ref.text
    for bad, message in (("   ", "the text prompt is empty"), ("word " * 120, "more than the 100")):
        with pytest.raises(SystemExit) as e:
            main([*args, "-o", str(tmp_path / "o.wav"), "--text-prompt", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
