"""The PersonaPlex prompt phase (issue 13): frames of forced tokens, checked frame by frame on what
the model reads, and whole persona conversations checked against an oracle of PersonaPlex's own
generation (`personaplex_oracle`, on the official model), on a random dep_q = 16 checkpoint in
PersonaPlex's layout made here; voice presets saved as PersonaPlex saves them; voices from files and
folders; `openmoshi infer --text-prompt --voice-prompt`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from infer_utils import MOSHI, NAMES, make_checkpoint
from official_utils import speech
from openmoshi.audio import SAMPLE_RATE, save_wav
from openmoshi.inference.offline import persona_prompt, run
from openmoshi.lm import generate as G
from openmoshi.lm.persona import Preset, PromptError, build_prompt, run_prompts, wrap_system
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.loading.voices import VoiceError, list_voices, load_voice, normalize_loudness, resolve_voice
from personaplex_oracle import PROMPT_TEXT, SILENCE, SILENCE_FRAMES, SINE, converse, save_preset, voice_codes
from personaplex_oracle import wrap_system as personaplex_wrap
from wire_utils import frames

PERSONAPLEX = dict(MOSHI, dep_q=16, context=200)  # card 2048, so that the silence and sine codes exist


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personaplex") / "repo"
    make_checkpoint(folder, "moshi", seed=3, lm_kwargs=PERSONAPLEX, small_mimi=True)
    m = load_model(resolve_files(str(folder)), device="cpu", dtype="float32")
    assert m.lm.cfg.depformer_user_slots == 8 and m.mimi.num_codebooks == 8
    return m


@pytest.fixture(scope="module")
def official(model):
    """The official Mimi and LMModel of the same files: what PersonaPlex's LMGen runs on."""
    return official_models(Path(model.files.hf_repo))


def official_models(folder: Path):
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"], folder / NAMES["mimi_name"],
                                               folder / NAMES["tokenizer_name"], folder / "config.json",
                                               mimi_config_path=folder / "mimi.json")
    return info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.float32)


def official_pcm(mimi, codes: list[list[int]]) -> np.ndarray:
    """The official Mimi's streaming decoding of frames of 8 codes, from a fresh state."""
    with torch.no_grad(), mimi.streaming(1):
        return torch.cat([mimi.decode(torch.tensor(c)[None, :, None]) for c in codes], -1)[0, 0].numpy()


def assert_personaplex_s(result, oracle: list, mimi) -> None:
    """An offline persona result against the oracle's conversation steps: PersonaPlex's first step
    returns the prompt's last frame (silence), ours starts with the frame after it, so our frame i is
    its step i + 1: the same text token, and our sound the official decoding of its codes."""
    assert oracle[0] == (PROMPT_TEXT, list(SILENCE))
    n = len(oracle) - 1
    assert len(result.text_tokens) == len(oracle)
    assert result.text_tokens[:n] == [text for text, _ in oracle[1:]]
    want = official_pcm(mimi, [codes for _, codes in oracle[1:]])
    assert np.abs(result.audio[0, :n * 1920].numpy() - want).max() < 1e-4 * np.abs(want).max()


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
    """(text [N], model [N, 8]) of the prompt, written out phase by phase in PersonaPlex's order
    (`step_system_prompts`) with its numbers (`personaplex_oracle`)."""
    rows = []
    for codes in (voice if voice is not None else []):
        rows.append((PROMPT_TEXT, codes.tolist()))
    rows += [(PROMPT_TEXT, list(SILENCE))] * SILENCE_FRAMES
    rows += [(t, list(SILENCE)) for t in text]
    rows += [(PROMPT_TEXT, list(SILENCE))] * SILENCE_FRAMES
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
        assert (p.user == torch.tensor(SINE)).all()
    state = G.init_state(lm, 2, SamplingConfig(temp=0.8, temp_text=0.7))
    seen = reading(lm)
    run_prompts(lm, state, prompts, torch.Generator().manual_seed(6))
    assert state.streams.offset.tolist() == [20, 19]
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
    assert torch.equal(seen[-1][:, 2:9], torch.tensor(SILENCE[1:]).expand(2, 7))
    assert torch.equal(seen[-1][:, 9], user[:, 0])
    assert torch.equal(seen[-1][:, 10:], torch.tensor(SINE[1:]).expand(2, 7))
    assert out.valid.all()
    del lm.forward_text


def test_a_persona_conversation_is_personaplex_s(model, official, tmp_path):
    """`openmoshi infer --text-prompt --voice-prompt`'s path (offline generation with
    `persona_prompt`) against the oracle of PersonaPlex's generation on the official model: its
    prompt steps in its order (voice, silence, <system> text, silence), its voice encoding, and the
    conversation after, frame for frame. A prompt laid out otherwise gives another conversation."""
    mimi, lm = official
    voice = tmp_path / "ada.wav"
    save_wav(voice, speech(0.8)[None], SAMPLE_RATE)
    user = frames((0.5 * speech(2.2)[24000:]).numpy())  # 15 frames
    text = "You are Ada, a calm tutor."
    tokens = sentencepiece.SentencePieceProcessor(str(Path(model.files.hf_repo) / NAMES["tokenizer_name"])).encode(
        personaplex_wrap(text))
    oracle, _ = converse(lm, mimi, voice_codes(voice, mimi), tokens, user)
    assert len(oracle) == len(user) == 15 and len({t for t, _ in oracle}) > 3
    greedy = SamplingConfig.greedy()
    ours = run(model, [np.concatenate(user)], greedy, prompt=persona_prompt(model, text, voice), cuda_graph=False)[0]
    assert_personaplex_s(ours, oracle, mimi)
    codes = load_voice(voice, model.mimi, model.lm.cfg)
    short = build_prompt(model.lm.cfg, codes, tokens, spacer=SILENCE_FRAMES - 1)
    other = run(model, [np.concatenate(user)], greedy, prompt=short, cuda_graph=False)[0]
    assert other.text_tokens[:14] != ours.text_tokens[:14] or not torch.equal(other.audio, ours.audio)


def test_a_personaplex_preset_gives_personaplex_s_conversation(model, official, tmp_path):
    """A voice preset as PersonaPlex saves one after a live voice prompt (`save_voice_prompt_embeddings`:
    `torch.save` of {"embeddings": the voice steps' input embeddings [F - 1, 1, 1, D], "cache": the
    token cache [1, K, max_delay + 3]}, made here by the oracle) gives, loaded by ours, PersonaPlex's
    conversation: the oracle's with the live voice, which its replay of the file gives too."""
    mimi, lm = official
    g = torch.Generator().manual_seed(8)
    voice = torch.randint(0, 2048, (7, 8), generator=g)
    user = frames(speech(1.2).numpy())
    save_preset(lm, voice, tmp_path / "v.pt")
    live, _ = converse(lm, mimi, voice, [31, 32], user)
    replayed, _ = converse(lm, mimi, torch.load(tmp_path / "v.pt"), [31, 32], user)
    assert replayed == live
    preset = load_voice(tmp_path / "v.pt", model.mimi, model.lm.cfg)
    assert isinstance(preset, Preset) and preset.frames == 7
    greedy = SamplingConfig.greedy()
    ours = run(model, [np.concatenate(user)], greedy, prompt=build_prompt(model.lm.cfg, preset, [31, 32]),
               cuda_graph=False)[0]
    assert_personaplex_s(ours, live, mimi)
    # Not trivially: a preset whose cache is off by one position gives another conversation.
    shifted = Preset(preset.embeddings, preset.cache.roll(1, dims=1))
    other = run(model, [np.concatenate(user)], greedy, prompt=build_prompt(model.lm.cfg, shifted, [31, 32]),
                cuda_graph=False)[0]
    assert other.text_tokens != ours.text_tokens or not torch.equal(other.audio, ours.audio)


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
    from openmoshi.cli.main import main

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
