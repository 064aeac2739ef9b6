"""Persona prompts (NVIDIA PersonaPlex): the prompt phase a conversation runs before its handshake,
as frames of forced tokens.

    prompt = build_prompt(lm.cfg, voice_codes, tokenizer.encode(wrap_system(text)))
    run_prompts(lm, state, [prompt] * B)          # every slot at once; or, per slot and per tick:
    cursor = PromptCursor(prompt, lm.cfg)         # cursor.inputs(), step, cursor.after_step(state, b)

The phase, in frame time (PersonaPlex's order and lengths):

    voice prompt   | spacer 0.5 s | <system> text <system> | spacer 0.5 s | conversation ...
    text:  PAD ... | PAD ...      | one token per frame    | PAD ...      | sampled
    model: voice   | SILENCE      | SILENCE                | SILENCE      | sampled
    user:  SINE    | SINE         | SINE                   | SINE         | the user's codes

The voice is either Mimi codes (a WAV normalised to -24 LUFS, `loading.voices`), or a preset
saved by PersonaPlex: the temporal transformer's input embedding for each voice frame's step and
the token cache at its end, replayed (`Preset`). Frame 0 of a prompt is never read (the first
step reads initial tokens), as in PersonaPlex.

Step s of a slot's prompt is given the user's codes of prompt frame s and forces frame s + 1
(the frame whose text it samples, see `generate`); the prompt's N frames take N steps, the last
of which reads the last spacer frame and samples the conversation's first frame freely, as
PersonaPlex's first conversation step does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openmoshi.errors import UserError
from openmoshi.lm import generate as G
from openmoshi.lm.config import TEXT_PADDING_ID, LMConfig
from openmoshi.lm.model import LMModel

# Mimi codes (first 8 codebooks) PersonaPlex forces for "the model is silent" and for the user's
# side during the prompt (one frame of a 440 Hz sine at amplitude 0.5).
SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SPACER_FRAMES = 6  # int(0.5 s * 12.5 Hz)
SYSTEM_TAG = "<system>"


class PromptError(UserError):
    """A persona prompt that cannot be used; the message says why."""


def wrap_system(text: str) -> str:
    """`<system> text <system>`, unless the text is wrapped already (PersonaPlex's form)."""
    cleaned = text.strip()
    if not cleaned:
        raise PromptError("the text prompt is empty")
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG) and len(cleaned) > len(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


@dataclass(frozen=True)
class Preset:
    """A PersonaPlex voice preset (`.pt`): the input embeddings of the voice prompt's steps and
    the token cache (a ring of `ring` positions, position p at p % ring) after its F frames."""

    embeddings: torch.Tensor  # [F - 1, D]
    cache: torch.Tensor  # [K, ring] long

    @property
    def frames(self) -> int:
        return self.embeddings.shape[0] + 1


@dataclass(frozen=True)
class Prompt:
    """The prompt phase of one conversation, one row per frame (see the module doc)."""

    text: torch.Tensor  # [N] long
    model: torch.Tensor  # [N, Q] long, the model's audio codes
    user: torch.Tensor  # [N, Ku] long
    preset: Preset | None = None  # replayed over the first preset.frames frames

    @property
    def frames(self) -> int:
        return self.text.shape[0]


def check_model(cfg: LMConfig) -> None:
    """PromptError unless the model can take persona prompts (its silence and sine codes)."""
    Q, Ku = cfg.gen_q, cfg.num_user_codebooks
    if Q != len(SILENCE_CODES) or Ku != len(SINE_CODES) or cfg.card <= max(SILENCE_CODES + SINE_CODES):
        raise PromptError(f"persona prompts need a model with 8 audio codebooks of 2048 codes each side "
                          f"(PersonaPlex, Moshi), this one has {Q} and {Ku} of {cfg.card}")


def build_prompt(cfg: LMConfig, voice: torch.Tensor | Preset | None = None,
                 text_tokens: Sequence[int] | None = None, spacer: int = SPACER_FRAMES,
                 max_frames: int | None = None) -> Prompt:
    """The prompt of a voice (Mimi codes [F, >= Q] or a Preset) and text tokens (of the wrapped
    text prompt). Codes and presets are checked against `cfg`; the prompt must leave room in the
    context window (`max_frames`, default: half the context)."""
    check_model(cfg)
    Q, Ku = cfg.gen_q, cfg.num_user_codebooks
    silence = torch.tensor(SILENCE_CODES)
    parts_text, parts_model = [], []
    preset = None
    if isinstance(voice, Preset):
        preset = voice
        check_preset(preset, cfg)
        parts_model.append(silence.expand(preset.frames, Q))  # never read: replayed instead
    elif voice is not None:
        if voice.dim() != 2 or voice.shape[1] < Q or voice.shape[0] < 1:
            raise PromptError(f"voice codes must be [frames, {Q}], got {list(voice.shape)}")
        G.check_codes(voice, cfg.card - 1, "voice codes")
        parts_model.append(voice[:, :Q].long())
    if parts_model:
        parts_text.append(torch.full((parts_model[0].shape[0],), TEXT_PADDING_ID))
    tokens = torch.tensor(list(text_tokens or ()), dtype=torch.long)
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.text_card):
        raise PromptError(f"text prompt tokens must be in [0, {cfg.text_card})")
    for t in (torch.full((spacer,), TEXT_PADDING_ID), tokens, torch.full((spacer,), TEXT_PADDING_ID)):
        parts_text.append(t)
        parts_model.append(silence.expand(len(t), Q))
    text = torch.cat(parts_text)
    limit = max_frames if max_frames is not None else (cfg.context or 4096) // 2
    if text.shape[0] > limit:
        raise PromptError(f"the prompt takes {text.shape[0]} frames ({text.shape[0] / 12.5:.1f} s), more than the "
                          f"{limit} the context window leaves for it: shorten the text or the voice prompt")
    user = torch.tensor(SINE_CODES).expand(text.shape[0], Ku)
    return Prompt(text=text, model=torch.cat(parts_model), user=user.clone(), preset=preset)


def check_preset(preset: Preset, cfg: LMConfig) -> None:
    K = cfg.num_codebooks
    if preset.embeddings.dim() != 2 or preset.embeddings.shape[1] != cfg.dim or preset.embeddings.shape[0] < 1:
        raise PromptError(f"the voice preset's embeddings are {list(preset.embeddings.shape)}, the model needs "
                          f"[frames, {cfg.dim}]: a preset made for another model?")
    if preset.cache.dim() != 2 or preset.cache.shape[0] != K or preset.cache.shape[1] < cfg.max_delay + 2:
        raise PromptError(f"the voice preset's cache is {list(preset.cache.shape)}, the model needs "
                          f"[{K}, >= {cfg.max_delay + 2}]")


class PromptCursor:
    """One slot's way through its prompt, a step at a time (the server runs one per slot)."""

    def __init__(self, prompt: Prompt, cfg: LMConfig):
        self.prompt, self.cfg, self.step = prompt, cfg, 0

    @property
    def done(self) -> bool:
        return self.step >= self.prompt.frames

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(user codes [Ku], forced [1 + Q], input embedding [D] or None) of the next step."""
        p, s = self.prompt, self.step
        forced = torch.full((1 + self.cfg.gen_q,), G.NOT_FORCED, dtype=torch.long)
        if s + 1 < p.frames:
            forced[0] = p.text[s + 1]
            forced[1:] = p.model[s + 1]
        emb = None
        if p.preset is not None and s < p.preset.frames - 1:
            emb = p.preset.embeddings[s]
        return p.user[s], forced, emb

    def after_step(self, state: G.GenState, slot: int) -> None:
        """Call after the slot's step: at the end of a replayed preset, its token cache."""
        self.step += 1
        p = self.prompt.preset
        if p is not None and self.step == p.frames - 1:
            load_preset_cache(state, slot, p.cache, p.frames, self.cfg)


def load_preset_cache(state: G.GenState, slot: int, ring: torch.Tensor, frames: int, cfg: LMConfig) -> None:
    """Puts a preset's tokens where a live voice prompt of `frames` frames would have left them,
    the slot being one step short of it (offset frames - 1): every stream's position frames - 1,
    and the later positions of the delayed streams, the model's as forced tokens still to come."""
    streams = state.streams
    C, R, Q = streams.cache.shape[2], ring.shape[1], cfg.gen_q
    ring = ring.to(streams.cache.device)
    for k, d in enumerate(cfg.delays):
        for p in range(frames - 1, frames + d - (0 if k <= Q else 1)):
            if p == frames - 1:
                streams.cache[slot, k, p % C] = ring[k, p % R]
            elif k <= Q:
                streams.forced[slot, k, p % C] = ring[k, p % R]
            else:
                streams.cache[slot, k, p % C] = ring[k, p % R]


def run_prompts(lm: LMModel, state: G.GenState, prompts: Sequence[Prompt | None],
                generator: torch.Generator | None = None) -> None:
    """Runs every slot's prompt (None: none) from the slots' current state, in lockstep; a slot
    whose prompt is over waits (inactive) for the others."""
    B = state.batch_size
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts for {B} slots")
    cursors = [None if p is None else PromptCursor(p, lm.cfg) for p in prompts]
    device = state.streams.cache.device
    Ku, Q, D = lm.cfg.num_user_codebooks, lm.cfg.gen_q, lm.cfg.dim
    while any(c is not None and not c.done for c in cursors):
        user = torch.zeros(B, Ku, dtype=torch.long)
        forced = torch.full((B, 1 + Q), G.NOT_FORCED, dtype=torch.long)
        emb, use = torch.zeros(B, 1, D), torch.zeros(B, dtype=torch.bool)
        active = torch.tensor([c is not None and not c.done for c in cursors])
        for b, c in enumerate(cursors):
            if active[b]:
                user[b], forced[b], e = c.inputs()
                if e is not None:
                    emb[b, 0], use[b] = e, True
        G.step(lm, state, user.to(device), active.to(device), generator, forced=forced.to(device),
               embeddings=(emb.to(device), use.to(device)) if bool(use.any()) else None)
        for b, c in enumerate(cursors):
            if active[b]:
                c.after_step(state, b)
