"""An oracle of NVIDIA PersonaPlex's prompt phase and conversation, greedy, batch 1, on the official
moshi LMModel, written for these tests from PersonaPlex's `moshi/moshi/models/lm.py` (LMGen:
`prepare_step_input`, `step`, `step_embeddings`, `process_transformer_output`,
`step_system_prompts` and the `_step_*` phases it runs; MIT licence) and its `offline.py` /
`server.py` (commit 3428dfd of github.com/NVIDIA/personaplex). Nothing here comes from
openmoshi.lm.persona: the numbers are PersonaPlex's, each with where it comes from.

    pp = PersonaPlex(lm)                    # lm: the official moshi LMModel of a dep_q = 16 checkpoint
    with pp.streaming():
        preset = pp.system_prompts(voice_codes, text_tokens)   # or a preset dict, replayed
        out = [pp.step(user=codes) for codes in user_frames]   # (text, 8 model codes) per step

PersonaPlex keeps one token cache of max_delay + 3 positions per stream with a "provided" flag per
entry: tokens it is given for a step go to (offset + the stream's delay); the step reads position
offset - 1, samples position offset, and keeps what was given where it was given. Its steps return
the frame at offset - max_delay, so its first conversation step returns the last prompt frame.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

# lm.py: SILENCE_TOKENS, the model's 8 codes of every prompt frame but the voice's (_encode_zero_frame).
SILENCE = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
# lm.py: SINE_TOKENS, the user's 8 codes of every prompt frame (_encode_sine_frame).
SINE = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
# lm.py: LMGen.zero_text_code, the text of voice and silence frames (the padding id).
PROMPT_TEXT = 3
# offline.py and server.py: audio_silence_frame_cnt=int(0.5 * mimi.frame_rate), the silence after
# the voice and after the text.
SILENCE_FRAMES = int(0.5 * 12.5)
# lm.py: _init_streaming_state, the token cache's length beyond the largest delay.
RING_EXTRA = 3
# lm.py: LMModel.ungenerated_token_id, what the cache holds before anything is written.
UNGENERATED = -2
# lm.py: normalize_audio / load_voice_prompt, the voice prompt's loudness.
VOICE_LUFS = -24.0
FRAME = 1920  # 24 kHz / 12.5 Hz


def wrap_system(text: str) -> str:
    """offline.py / server.py wrap_with_system_tags."""
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


def voice_codes(path: str | Path, mimi) -> torch.Tensor:
    """A voice file as LMGen.load_voice_prompt and _encode_voice_prompt_frames make it: read with sphn,
    loudness -24 LUFS (pyloudnorm on the samples as read), cut into frames (the last zero-padded),
    each encoded by the official Mimi, streaming from a fresh state. [F, 8]."""
    import pyloudnorm
    import sphn

    pcm, rate = sphn.read(str(path))
    pcm = sphn.resample(pcm, src_sample_rate=rate, dst_sample_rate=mimi.sample_rate)[0]
    pcm = pyloudnorm.normalize.loudness(pcm, pyloudnorm.Meter(mimi.sample_rate).integrated_loudness(pcm), VOICE_LUFS)
    n = -(-len(pcm) // FRAME)
    pcm = np.concatenate([pcm, np.zeros(n * FRAME - len(pcm))])
    codes = []
    with torch.no_grad(), mimi.streaming(1):
        for i in range(n):
            frame = torch.tensor(pcm[i * FRAME:(i + 1) * FRAME], dtype=torch.float32)[None, None]
            codes.append(mimi.encode(frame)[0, :8, 0])
    return torch.stack(codes)


def user_codes(frames: list[np.ndarray], mimi) -> list[torch.Tensor]:
    """The conversation's user frames, encoded as offline.py does after the prompts (Mimi reset)."""
    with torch.no_grad(), mimi.streaming(1):
        return [mimi.encode(torch.from_numpy(f)[None, None])[0, :8, 0] for f in frames]


class PersonaPlex:
    """LMGen of PersonaPlex, greedy (`use_sampling=False`), batch 1."""

    def __init__(self, lm):
        self.lm = lm
        self.delays = list(lm.delays)
        self.K, self.dep_q = lm.num_codebooks, lm.dep_q
        self.max_delay = max(self.delays)
        self.R = self.max_delay + RING_EXTRA
        # _get_initial_token: the text card for text, the audio card for every audio stream.
        self.initial = [lm.text_card] + [lm.card] * lm.n_q

    @contextlib.contextmanager
    def streaming(self):
        self.cache = torch.full((self.K, self.R), UNGENERATED, dtype=torch.long)
        self.provided = torch.zeros(self.K, self.R, dtype=torch.bool)
        self.offset = 0
        with torch.no_grad(), self.lm.streaming(1):
            yield self

    def _prepare(self, user=None, model=None, text=None):
        """prepare_step_input: writes what is given; None at offset 0, else (input, target, provided)."""
        R, o = self.R, self.offset
        given = {}
        if user is not None:  # input_tokens: the user's streams 9..16
            given.update({9 + q: int(t) for q, t in enumerate(user)})
        if model is not None:  # moshi_tokens: the model's streams 1..8
            given.update({1 + q: int(t) for q, t in enumerate(model)})
        if text is not None:
            given[0] = int(text)
        for k, t in given.items():
            self.cache[k, (o + self.delays[k]) % R] = t
            self.provided[k, (o + self.delays[k]) % R] = True
        for k, d in enumerate(self.delays):  # a delayed stream's first positions hold the initial token
            if o <= d:
                self.cache[k, o % R] = self.initial[k]
                self.provided[k, o % R] = True
        if o == 0:
            self.cache[:, 0] = torch.tensor(self.initial)
            self.offset += 1
            return None
        return self.cache[:, (o - 1) % R].clone(), self.cache[:, o % R].clone(), self.provided[:, o % R].clone()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """LMModel.embed_codes of one frame [K] -> [1, 1, D]: the sum of every stream's embedding."""
        seq = tokens.view(1, self.K, 1)
        out = self.lm.text_emb(seq[:, 0])
        for q in range(self.lm.n_q):
            out = out + self.lm.emb[q](seq[:, q + 1])
        return out

    def step(self, user=None, model=None, text=None, embedding=None, embeddings_out: list | None = None):
        """LMGen.step (or step_embeddings with `embedding` [1, 1, D]): None or (text, 8 model codes)."""
        if embedding is not None:  # step_embeddings: placeholders are given for everything
            while (prepared := self._prepare(user=[self.lm.card] * 8, model=[self.lm.card] * 8, text=PROMPT_TEXT)) is None:
                pass
            x = embedding
        else:
            prepared = self._prepare(user, model, text)
            if prepared is None:
                return None
            x = self.embed(prepared[0])
            if embeddings_out is not None:  # return_embeddings: the input's embedding
                embeddings_out.append(x)
        _, target, provided = prepared
        hidden = self.lm.transformer(x)  # forward_embeddings
        hidden = self.lm.out_norm(hidden)
        text_token = int(self.lm.text_linear(hidden)[0, 0].argmax())
        return self._process(hidden, text_token, target, provided)

    def _process(self, hidden, text_token, target, provided):
        """process_transformer_output and depformer_step: the depth transformer is fed the given
        tokens where there are some, its own otherwise; what was given stays in the cache."""
        R, o = self.R, self.offset
        previous = int(target[0]) if provided[0] else text_token
        audio = []
        with self.lm.depformer.streaming(1):
            for q in range(self.dep_q):
                logits = self.lm.forward_depformer(q, torch.tensor([[[previous]]]), hidden)
                token = int(logits[0, 0, 0].argmax())
                audio.append(token)
                previous = int(target[1 + q]) if provided[1 + q] else token
        self.provided[:, (o - 1) % R] = False
        sampled = torch.tensor([text_token] + audio)
        at = self.cache[:self.dep_q + 1, o % R]
        self.cache[:self.dep_q + 1, o % R] = torch.where(self.provided[:self.dep_q + 1, o % R], at, sampled)
        self.offset += 1
        if o <= self.max_delay:
            return None
        frame = [int(self.cache[k, (o - self.max_delay + self.delays[k]) % R]) for k in range(9)]
        return frame[0], frame[1:]

    def system_prompts(self, voice: torch.Tensor | dict | None, text_tokens: list[int] | None):
        """step_system_prompts: the voice (codes [F, 8], or a preset dict replayed), silence, the text,
        silence. For a voice given as codes, returns the preset PersonaPlex would save of it
        (`save_voice_prompt_embeddings`): {"embeddings": [F - 1, 1, 1, D], "cache": [1, K, R]}."""
        preset = None
        if isinstance(voice, dict):  # _step_voice_prompt_core, replaying stored embeddings
            for embedding in voice["embeddings"]:
                self.step(embedding=embedding.float())
            self.cache.copy_(voice["cache"][0])
        elif voice is not None:
            saved: list = []
            for codes in voice:
                self.step(user=SINE, model=codes, text=PROMPT_TEXT, embeddings_out=saved)
            preset = {"embeddings": torch.stack(saved).detach(), "cache": self.cache[None].clone()}
        for part in ([PROMPT_TEXT] * SILENCE_FRAMES, text_tokens or [], [PROMPT_TEXT] * SILENCE_FRAMES):
            for token in part:  # _step_audio_silence and _step_text_prompt: the model silent
                self.step(user=SINE, model=SILENCE, text=token)
        return preset


def converse(lm, mimi, voice, text_tokens, frames: list[np.ndarray]):
    """offline.py run_inference: prompts, then one step per user frame. ([(text, codes)] per
    conversation step, the preset of a voice given as codes)."""
    pp = PersonaPlex(lm)
    codes = user_codes(frames, mimi)
    with pp.streaming():
        preset = pp.system_prompts(voice, text_tokens)
        out = [pp.step(user=c) for c in codes]
    return out, preset


def save_preset(lm, voice: torch.Tensor, path: str | Path) -> dict:
    """The `.pt` PersonaPlex writes after a live voice prompt of codes [F, 8] (LMGen with
    save_voice_prompt_embeddings: `torch.save({"embeddings", "cache"}, <voice>.pt)`)."""
    pp = PersonaPlex(lm)
    with pp.streaming():
        preset = pp.system_prompts(voice, None)
    torch.save(preset, path)
    return preset
