"""Kyutai TTS generation: the LM, its script state machine (`tts_script`), speaker conditions
and audio prefixes, one 80 ms frame per step, as plain functions on caller-owned state.

    spec = tts_spec(model_config)                           # what config.json says
    state = init_tts_state(lm, spec, TTSSettings(), batch_size=B, cross_len=L)
    start_slot(lm, spec, state, b, entries, conditions, prefix)   # a new stream in slot b
    out = tts_step(lm, spec, state)                         # out.frame [B, 1 + Q], out.valid [B]
    result = generate(lm, spec, settings, all_entries, conditions, prefixes)   # offline, as TTSModel.generate

Dimension glossary: B slots, R rows (2B with classifier-free guidance by batch doubling, else
B), K streams (1 text + n_q audio), Q audio codebooks generated (`TTSSettings.n_q`), L length of
the cross-attention source, P prefix frames.

What a step does, per slot (the behaviour of the official `TTSModel.generate` and the LMGen hooks
it installs, rewritten on our `GenState`):
1. The temporal transformer reads the frame's tokens (the audio codebooks not generated read
   ZERO); with guidance by batch doubling, the slot's second row reads its null condition and
   zeros instead of the text, and instead of the audio prefix while it lasts (plus its delay).
2. Text logits (the conditioned row's only: the text is not guided), plus `padding_bonus` on
   PAD, are sampled; the host turns the token into the text the LM reads (`tts_script.advance`),
   or ZERO while an audio prefix is being read.
3. The depth transformer samples the audio codebooks from that text (guided when doubling),
   except in the first `delay_steps` frames, where audio is ZERO: the audio is delayed by
   `tts_config.audio_delay` after the text, each codebook by its own delay on top. An audio
   prefix replaces the sampled codes in its frames, delayed the same way.
4. The frame `max_delay` steps back is returned: text (the muxed id) and audio, ZERO before the
   audio starts. The frames from `delay_steps` on are the audio to decode.
A stream ends `delay_steps + final_padding` frames after its script ran out (`Script.end_step`).

Classifier-free guidance: a checkpoint trained with CFG distillation has a `cfg` lookup-table
condition whose values ("1.0", "1.5", ...) are the coefficients it learnt; it takes the
coefficient there and runs one row per slot. Others double the rows (`TTSSettings.cfg_coef`).

For a server (streams joining and leaving, `/api/tts_streaming`): every slot has its own step
count, script, prefix and conditions; `start_slot` resets one slot between steps, `move_slot`
moves a stream to another slot, and `tts_step` takes an `active` mask: an inactive slot (e.g.
waiting for more words from its client, see `ready`) keeps its state untouched. Words can be
appended to `state.scripts[b].entries` while a stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from openmoshi.errors import UnsupportedError, UserError
from openmoshi.lm.conditioners import TensorValue
from openmoshi.lm.generate import (GenState, _rows, _sample, _write, depth_step, init_state, kept_draws, read_window,
                                  restore_draws)
from openmoshi.lm.model import LMModel
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.lm.tts_script import PAD, ZERO, Entry, Machine, Script, advance, new_script

FRAME_RATE = 12.5  # Mimi's frames per second
DEFAULT_MAX_SPEAKERS = 5
SPEAKER_CONDITION = "speaker_wavs"
CFG_CONDITION = "cfg"
CONTROL_CONDITION = "control"
CONTROL_VALUE = "ok"
_NEVER = -(1 << 40)  # a masked-until step no slot reaches


class TTSError(UserError):
    """A TTS input the model cannot take (a voice, a prefix, a cfg coefficient); the message says why."""


@dataclass(frozen=True)
class TTSSpec:
    """What a TTS checkpoint's config says about generation."""

    delay_steps: int  # frames between the text and its audio (tts_config.audio_delay * frame rate)
    second_stream_ahead: int  # words of lookahead on the second text stream (0: none)
    max_speakers: int  # speaker places in the cross-attention source
    multi_speaker: bool  # conditioned on speaker embeddings (else on an audio prefix)
    cfg_values: tuple[float, ...]  # coefficients of a CFG-distilled checkpoint (empty: not distilled)
    card: int  # text_card + 1: the base of the muxed text ids
    condition_names: tuple[str, ...]  # the model's conditions


@dataclass(frozen=True)
class TTSSettings:
    """Generation settings; the defaults are `moshi-tts`'s."""

    n_q: int | None = None  # audio codebooks to generate (None: all the model's)
    temp: float = 0.6  # text and audio temperature (<= 0: greedy)
    top_k: int = 250
    top_k_text: int = 25
    cfg_coef: float = 2.0
    max_padding: int = 8
    initial_padding: int = 2
    final_padding: int = 4
    padding_between: int = 1
    padding_bonus: float = 0.0
    max_gen_length: int = 30000

    def __post_init__(self):
        for name in ("max_padding", "top_k", "top_k_text", "max_gen_length"):
            if getattr(self, name) < 1:
                raise TTSError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("initial_padding", "final_padding", "padding_between"):
            if getattr(self, name) < 0:
                raise TTSError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_q is not None and self.n_q < 1:
            raise TTSError(f"n_q must be >= 1, got {self.n_q}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temp=self.temp, top_k=self.top_k, temp_text=self.temp, top_k_text=self.top_k_text)


def tts_spec(config, frame_rate: float = FRAME_RATE) -> TTSSpec:
    """The TTSSpec of a `ModelConfig` (config.json with `tts_config`); TTSError when it is not a
    TTS model this implementation runs."""
    tts, lm = config.tts_config, config.lm
    if not tts or "audio_delay" not in tts:
        raise TTSError(f"this {config.model_type} model is not a TTS model (its config.json has no "
                       "tts_config.audio_delay); use a Kyutai TTS checkpoint, e.g. --hf-repo kyutai/tts-1.6b-en_fr")
    unknown = set(tts) - {"audio_delay", "second_stream_ahead", "multistream", "max_speakers"}
    if unknown:
        raise TTSError(f"unknown tts_config key {sorted(unknown)[0]!r}")
    if tts.get("multistream"):
        raise UnsupportedError("tts_config.multistream (two audio streams) is not supported")
    for key, low, kinds in (("audio_delay", 0, (int, float)), ("second_stream_ahead", 0, (int,)), ("max_speakers", 1, (int,))):
        value = tts.get(key, low)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
            raise TTSError(f"tts_config.{key} must be a number >= {low}, got {value!r}")
    if lm.dep_q == 0 or lm.num_user_codebooks:
        raise TTSError(f"a TTS model generates all its audio codebooks (dep_q = n_q), got dep_q={lm.dep_q}, n_q={lm.n_q}")
    names = tuple(c.name for c in lm.conditioners or ())
    unknown = set(names) - {SPEAKER_CONDITION, CFG_CONDITION, CONTROL_CONDITION}
    if unknown:
        raise UnsupportedError(f"TTS condition {sorted(unknown)[0]!r} is not supported (known: speaker_wavs, cfg, control)")
    cfg_values: tuple[float, ...] = ()
    for c in lm.conditioners or ():
        if c.name == CFG_CONDITION:
            try:
                cfg_values = tuple(sorted(float(v) for v in c.possible_values or ()))
            except ValueError:
                raise TTSError(f"conditioners.cfg: possible_values must be coefficients, got {list(c.possible_values)}") from None
    if not names:
        raise TTSError("this TTS model has no conditioners: nothing to condition it on (speaker_wavs, cfg, control)")
    return TTSSpec(delay_steps=int(float(tts["audio_delay"]) * frame_rate),
                   second_stream_ahead=int(tts.get("second_stream_ahead", 0)),
                   max_speakers=int(tts.get("max_speakers", DEFAULT_MAX_SPEAKERS)),
                   multi_speaker=SPEAKER_CONDITION in names, cfg_values=cfg_values,
                   card=lm.text_card + 1, condition_names=names)


# ----------------------------------------------------------------------------- conditions


def speaker_value(voices: Sequence[torch.Tensor], max_speakers: int) -> TensorValue:
    """Speaker embeddings, one [E, T] per speaker (a voice file's `speaker_wavs[0]`), in order of the
    turns -> the speaker condition: max_speakers places of T vectors, the unused ones masked."""
    if not voices:
        raise TTSError("this TTS model needs a voice (a speaker embedding) for each stream")
    if len(voices) > max_speakers:
        raise TTSError(f"{len(voices)} voices given, this model takes at most {max_speakers} speakers")
    E, T = voices[0].shape
    tensor = torch.zeros(max_speakers, T, E)
    mask = torch.zeros(max_speakers, T, dtype=torch.bool)
    for i, v in enumerate(voices):
        if v.shape != (E, T):
            raise TTSError(f"voice {i} has shape {list(v.shape)}, the first voice {[E, T]}: voices must match")
        tensor[i] = v.t()
        mask[i] = True
    return TensorValue(tensor.view(max_speakers * T, E), mask.view(-1))


def condition_values(spec: TTSSpec, voices: Sequence[torch.Tensor] = (), cfg_value: float | None = None) -> dict:
    """The condition values of one stream: its speakers' embeddings (multi-speaker models) and, for a
    CFG-distilled model, the coefficient (`cfg_value`, one of `spec.cfg_values`; None: no condition)."""
    values: dict[str, Any] = {}
    if SPEAKER_CONDITION in spec.condition_names:
        values[SPEAKER_CONDITION] = speaker_value(voices, spec.max_speakers)
    if CONTROL_CONDITION in spec.condition_names:
        values[CONTROL_CONDITION] = CONTROL_VALUE
    if CFG_CONDITION in spec.condition_names:
        if cfg_value is not None and float(cfg_value) not in spec.cfg_values:
            raise TTSError(f"cfg coefficient {cfg_value} is not one this model was trained with: "
                           f"{', '.join(str(v) for v in spec.cfg_values)}")
        values[CFG_CONDITION] = None if cfg_value is None else format(float(cfg_value), ".1f")
    return values


def null_values(values: dict) -> dict:
    """The null condition classifier-free guidance steers away from: every value dropped (a speaker
    condition keeps its length, all masked)."""
    out = {}
    for name, v in values.items():
        if isinstance(v, TensorValue):
            t = torch.as_tensor(v.tensor)
            out[name] = TensorValue(torch.zeros_like(t), torch.zeros(t.shape[0], dtype=torch.bool))
        else:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- state


@dataclass
class TTSState:
    """A batch of TTS streams: the LM's `GenState` and each slot's host-side progress."""

    gen: GenState
    machine: Machine
    settings: TTSSettings
    n_q: int
    guided: bool  # classifier-free guidance by batch doubling (rows 2b, 2b + 1)
    steps: list[int]  # frames done by each slot (host copy of gen.streams.offset)
    scripts: list[Script | None]
    prefix_lens: list[int]  # frames of each slot's audio prefix (0: none)
    prefix_codes: torch.Tensor  # [B, Q, P] long, each slot's prefix codes (undelayed)
    prefix_len: torch.Tensor  # [B] long, device copy of prefix_lens
    masked_until: torch.Tensor  # [B] long, the null row reads zeros up to this step (plus delays)
    logged: list[list[tuple[int, int]]] = field(default_factory=list)  # (sampled, fed) per slot and step

    @property
    def batch_size(self) -> int:
        return len(self.steps)


def init_tts_state(lm: LMModel, spec: TTSSpec, settings: TTSSettings, batch_size: int, cross_len: int = 0,
                   max_prefix: int = 0, slot_streams: bool = False) -> TTSState:
    """A state for `batch_size` streams. `cross_len`: the length of the speaker condition
    (max_speakers x voice frames; multi-speaker models). `max_prefix`: the longest audio prefix, in
    frames (prefix-conditioned models)."""
    n_q = lm.cfg.dep_q if settings.n_q is None else settings.n_q
    if not 1 <= n_q <= lm.cfg.dep_q:
        raise TTSError(f"n_q={n_q}: this model generates between 1 and {lm.cfg.dep_q} audio codebooks")
    guided = settings.cfg_coef != 1.0 and not spec.cfg_values
    if lm.cfg.cross_attention and cross_len < 1:
        raise TTSError("a multi-speaker TTS model needs cross_len (max_speakers x voice frames)")
    gen = init_state(lm, batch_size, settings.sampling(), cfg_coef=settings.cfg_coef if guided else 1.0,
                     slot_streams=slot_streams, cross_len=cross_len if lm.cfg.cross_attention else 0)
    device = gen.streams.cache.device
    machine = Machine(card=spec.card, second_stream_ahead=spec.second_stream_ahead,
                      max_padding=settings.max_padding, initial_padding=settings.initial_padding)
    return TTSState(gen=gen, machine=machine, settings=settings, n_q=n_q, guided=guided,
                    steps=[0] * batch_size, scripts=[None] * batch_size, prefix_lens=[0] * batch_size,
                    prefix_codes=torch.full((batch_size, n_q, max(max_prefix, 1)), ZERO, dtype=torch.long, device=device),
                    prefix_len=torch.zeros(batch_size, dtype=torch.long, device=device),
                    masked_until=torch.full((batch_size,), _NEVER, dtype=torch.long, device=device),
                    logged=[[] for _ in range(batch_size)])


def set_conditions(lm: LMModel, state: TTSState, slots: Sequence[int], values: Sequence[dict]) -> None:
    """Sets the conditions of `slots` (one dict of condition values each, see `condition_values`);
    with guidance, their null rows too."""
    gen = state.gen
    attrs = list(values)
    if state.guided:
        attrs = [a for v in values for a in (v, null_values(v))]  # a slot's two rows side by side
    index = [r for s in slots for r in ((2 * s, 2 * s + 1) if state.guided else (s,))]
    R = gen.guidance.condition.shape[0]
    rows = torch.zeros(R, dtype=torch.bool)
    rows[index] = True
    cond = lm.condition_sum(attrs)  # [n rows, 1, D] float32
    full = torch.zeros(R, 1, cond.shape[-1], dtype=cond.dtype, device=cond.device)
    full[index] = cond
    target = gen.guidance.condition
    target.copy_(torch.where(rows.to(target.device)[:, None, None], full.to(target), target))
    if lm.cfg.cross_attention:
        L = gen.temporal.cross_keys[0].shape[2]
        src = lm.condition_cross([_padded(a, L) for a in attrs])  # [n rows, L, D]
        full = torch.zeros(R, L, src.shape[-1], dtype=src.dtype, device=src.device)
        full[index] = src
        lm.transformer.set_cross(gen.temporal, full, rows.to(full.device))


def _padded(values: dict, length: int) -> dict:
    """A stream's conditions with its speaker condition padded (masked) to `length` positions, as
    a longer voice in the same official batch pads it."""
    v = values.get(SPEAKER_CONDITION)
    if not isinstance(v, TensorValue):
        return values
    tensor = torch.as_tensor(v.tensor)
    mask = torch.ones(tensor.shape[0], dtype=torch.bool) if v.mask is None else torch.as_tensor(v.mask, dtype=torch.bool)
    n = tensor.shape[0]
    if n > length:
        raise TTSError(f"the speaker condition has {n} positions, this state holds {length}: "
                       "voices longer than the state was made for")
    if n < length:
        tensor = torch.cat([tensor, tensor.new_zeros(length - n, tensor.shape[1])])
        mask = torch.cat([mask, mask.new_zeros(length - n)])
    return {**values, SPEAKER_CONDITION: TensorValue(tensor, mask)}


def start_slot(lm: LMModel, spec: TTSSpec, state: TTSState, slot: int, entries: Sequence[Entry],
               values: dict | None = None, prefix: torch.Tensor | None = None) -> None:
    """A new stream in `slot`: its script, its conditions (None: keep the slot's) and its audio
    prefix (codes [n_q, P], prefix-conditioned models). Between steps; the other slots go on."""
    B = state.batch_size
    mask = torch.zeros(B, dtype=torch.bool)
    mask[slot] = True
    if values is not None:
        set_conditions(lm, state, [slot], [values])
    state.gen.reset(mask.to(state.gen.streams.cache.device))
    state.steps[slot] = 0
    state.scripts[slot] = new_script(entries, state.machine)
    state.logged[slot] = []
    P = 0
    if prefix is not None:
        if prefix.dim() != 2 or prefix.shape[0] < state.n_q:
            raise TTSError(f"an audio prefix must be codes [n_q >= {state.n_q}, frames], got {list(prefix.shape)}")
        P = prefix.shape[1]
        if P > state.prefix_codes.shape[2]:
            raise TTSError(f"the audio prefix has {P} frames, this state takes at most {state.prefix_codes.shape[2]}")
        state.prefix_codes[slot, :, :P] = prefix[:state.n_q].to(state.prefix_codes)
    state.prefix_lens[slot] = P
    state.prefix_len[slot] = P
    state.masked_until[slot] = P + spec.delay_steps if (P and state.guided) else _NEVER


def move_slot(state: TTSState, src: int, dst: int) -> None:
    """Slot `dst` takes over slot `src`'s stream (a server packing its streams into the first
    slots): the LM state, conditions and cross-attention keys, and the host-side script and prefix.
    Slot `src` is left as it was: start another stream there, or leave it inactive."""
    state.gen.move(src, dst)
    for name in ("steps", "scripts", "prefix_lens", "logged"):
        values = getattr(state, name)
        values[dst] = values[src]
    for t in (state.prefix_codes, state.prefix_len, state.masked_until):
        t[dst] = t[src]
    state.scripts[src], state.logged[src] = None, []  # one owner per script


# ----------------------------------------------------------------------------- the step


@dataclass
class TTSStepOutput:
    frame: torch.Tensor  # [B, 1 + Q] long: muxed text id and audio codes, ZERO before the audio starts
    valid: torch.Tensor  # [B] bool: a complete frame (the slot is past max_delay steps)
    popped: list[bool]  # an entry of the slot's script was consumed at this step


@torch.no_grad()
def tts_step(lm: LMModel, spec: TTSSpec, state: TTSState, active: Sequence[bool] | None = None,
             generator: torch.Generator | None = None) -> TTSStepOutput:
    """One frame for every slot (see the module doc). `active`: slots that step (None: all); the
    others keep their state."""
    gen, cfg, settings = state.gen, lm.cfg, state.settings
    streams, sampler, flags = gen.streams, gen.sampler, gen.sampler.flags
    B, Q, K, C = state.batch_size, state.n_q, cfg.num_codebooks, streams.cache.shape[2]
    device = streams.cache.device
    host_active = [True] * B if active is None else [bool(a) for a in active]
    act = None if active is None else torch.tensor(host_active, device=device)
    draws = kept_draws(sampler, act)
    streams.cache[:, Q + 1:].fill_(ZERO)  # the codebooks not generated read "no input"

    offset = streams.offset
    not_started = offset[:, None, None] <= streams.delays[None, :, None]  # [B, K, 1]
    if act is not None:
        not_started = not_started | ~act[:, None, None]
    index = (offset % C)[:, None, None].expand(B, K, 1)
    tokens = torch.where(not_started, streams.initial, streams.cache.gather(2, index))  # [B, K, 1]
    if state.guided:
        null = tokens.clone()
        limit = streams.delays[None, :, None] + state.masked_until[:, None, None]  # [B, K, 1]
        null = torch.where((offset[:, None, None] <= limit) & ~not_started, ZERO, null)  # the prefix, unseen
        null[:, :1] = torch.where(not_started[:, :1], null[:, :1], ZERO)  # no text
        tokens = torch.stack([tokens, null], dim=1).view(2 * B, K, 1)  # [R, K, 1]
    rows_active = None if act is None else _rows(gen, act)
    # No slot is further along than the steps since init: attend to the ring slots filled so far.
    hidden, text_logits = lm.forward_text(tokens, gen.temporal, rows_active, gen.guidance.condition,
                                          attend=read_window(gen.calls, gen))
    gen.calls += 1
    text_logits = text_logits[::2, 0] if state.guided else text_logits[:, 0]  # [B, N], the text is not guided
    if settings.padding_bonus:
        text_logits = text_logits.clone()
        text_logits[:, PAD] += settings.padding_bonus
    if flags.greedy_text:
        sampled = text_logits.argmax(dim=-1)
    else:
        sampled = _sample(sampler, 0, text_logits.float(), sampler.temp_text, sampler.top_k_text,
                          flags.max_k_text, generator)

    # The host turns the sampled tokens into what the LM reads (one sync per step).
    fed, popped = [], [False] * B
    for b, token in enumerate(sampled.tolist()):
        if not host_active[b] or state.scripts[b] is None:
            fed.append(PAD)
            continue
        step = state.steps[b]
        if step < state.prefix_lens[b]:
            out = ZERO  # an audio prefix reads no text
        else:
            out, popped[b] = advance(state.machine, state.scripts[b], step, token)
        state.logged[b].append((token, out))
        fed.append(out)
    text = torch.tensor(fed, dtype=torch.long, device=device)  # [B]

    delays = streams.delays[1:Q + 1]  # [Q]
    if all(state.steps[b] < spec.delay_steps for b in range(B) if host_active[b]):
        audio = torch.full((B, Q), ZERO, dtype=torch.long, device=device)  # no audio yet: skip the depth
    else:
        # A slot whose audio has not started samples none: its audio stream is not drawn from, so
        # what it says does not depend on whether a neighbour needed the depth transformer.
        silent = torch.tensor([not host_active[b] or state.steps[b] < spec.delay_steps for b in range(B)],
                              device=device)
        before = kept_draws(sampler, ~silent)
        audio = depth_step(lm, gen, text, hidden, generator, num=Q)  # [B, Q]
        restore_draws(sampler, ~silent, before)
    audio = torch.where(offset[:, None] < delays + spec.delay_steps, ZERO, audio)
    at = offset[:, None] - delays - spec.delay_steps  # [B, Q], the prefix frame of each codebook
    in_prefix = (at >= 0) & (at < state.prefix_len[:, None])
    forced = state.prefix_codes.gather(2, at.clamp(0, state.prefix_codes.shape[2] - 1)[..., None])[..., 0]
    audio = torch.where(in_prefix, forced, audio)

    if act is None:
        offset.add_(1)
    else:
        offset.add_(act.long())
    position = (offset % C)[:, None]
    _write(streams.cache[:, :Q + 1], position.expand(B, Q + 1), torch.cat([text[:, None], audio], dim=1), act)
    for b in range(B):
        state.steps[b] += host_active[b]

    back = (offset[:, None] - cfg.max_delay + streams.delays[:Q + 1]) % C  # [B, 1 + Q]
    frame = streams.cache[:, :Q + 1].gather(2, back[..., None])[..., 0]
    valid = offset > cfg.max_delay
    if act is not None:
        valid = valid & act
    restore_draws(sampler, act, draws)
    return TTSStepOutput(frame=frame, valid=valid, popped=popped)


def ready(state: TTSState, slot: int, text_complete: bool) -> bool:
    """Whether a slot fed word by word (a streaming client) can step without reading past the words
    it has: all its text is in (`text_complete`), or its next entry is a break, or it holds the next
    word and the `second_stream_ahead` after it. A slot that is not ready waits (inactive); waiting
    changes nothing of what it will say, so a stream fed word by word says what its whole text
    given at once says. Its entries come from `script_to_entries(tokenizer, [chunk], ...)` with
    `multi_speaker` only for the first chunk (the speaker token starts the stream)."""
    script = state.scripts[slot]
    if script is None:
        return False
    if text_complete:
        return True
    if not script.entries:
        return False
    if state.machine.second_stream_ahead == 0 or not script.entries[0].tokens:
        return True
    return script.words_ahead() >= state.machine.second_stream_ahead + 1


def word_timings(script: Script, frame_rate: float = FRAME_RATE, offset: int = 0) -> list[tuple[str, float, float | None]]:
    """(word, start, end) in seconds of the stream's audio for each word said so far: a word starts
    at the frame its text was fed (its sound starts there in the decoded output, which begins
    `delay_steps` frames in) and ends where the next entry (word or break) or the script's end
    starts; None while that is not known yet (a server sends a word once its end is). `offset`:
    frames cut from the start of the audio (an audio prefix)."""
    out = []
    for text, step in script.transcript:
        later = [t for t in script.consumption_times if t > step]
        stop = later[0] if later else script.end_step
        out.append((text, (step - offset) / frame_rate, None if stop is None else (stop - offset) / frame_rate))
    return out


def finished(spec: TTSSpec, state: TTSState, slot: int) -> bool:
    """Whether a slot's stream has produced all it will: its script ran out `delay_steps +
    final_padding` frames ago."""
    script = state.scripts[slot]
    end = None if script is None else script.end_step
    return end is not None and state.steps[slot] >= end + spec.delay_steps + state.settings.final_padding


# ----------------------------------------------------------------------------- offline


@dataclass
class TTSResult:
    frames: torch.Tensor  # [B, 1 + Q, T] long: muxed text and audio codes, frame t at frame-time t
    scripts: list[Script]  # each stream's script at the end (`word_timings`)
    end_steps: list[int | None]  # where each script ran out (None: not within max_gen_length)
    transcripts: list[list[tuple[str, int]]]  # (word, step) of each word
    consumption_times: list[list[int]]  # step of each entry consumed
    logged_text: list[list[tuple[int, int]]]  # (sampled, fed) text per step


@torch.no_grad()
def generate(lm: LMModel, spec: TTSSpec, settings: TTSSettings, all_entries: Sequence[Sequence[Entry]],
             values: Sequence[dict], prefixes: Sequence[torch.Tensor] | None = None,
             generator: torch.Generator | None = None,
             on_frame: Callable[[torch.Tensor], None] | None = None) -> TTSResult:
    """Speaks a batch of scripts together, as the official `TTSModel.generate`: until every script
    has run out and `delay_steps + final_padding` frames more, or `max_gen_length` frames."""
    B = len(all_entries)
    if len(values) != B or (prefixes is not None and len(prefixes) != B):
        raise TTSError(f"{B} scripts but {len(values)} conditions"
                       + ("" if prefixes is None else f" and {len(prefixes)} prefixes"))
    cross_len = 0
    if lm.cfg.cross_attention:
        cross_len = max(torch.as_tensor(v[SPEAKER_CONDITION].tensor).shape[0] for v in values)
    max_prefix = max((p.shape[-1] for p in prefixes), default=0) if prefixes is not None else 0
    state = init_tts_state(lm, spec, settings, B, cross_len, max_prefix)
    set_conditions(lm, state, range(B), values)
    for b in range(B):
        start_slot(lm, spec, state, b, all_entries[b], None, None if prefixes is None else prefixes[b])
    frames = []
    for step in range(settings.max_gen_length):
        if all(s.end_step is not None for s in state.scripts):
            if step >= max(s.end_step for s in state.scripts) + spec.delay_steps + settings.final_padding:
                break
        out = tts_step(lm, spec, state, generator=generator)
        if step >= lm.cfg.max_delay:
            frames.append(out.frame)
            if on_frame is not None:
                on_frame(out.frame)
    frames_t = torch.stack(frames, dim=-1) if frames else torch.zeros(B, state.n_q + 1, 0, dtype=torch.long)
    return TTSResult(frames=frames_t, scripts=list(state.scripts), end_steps=[s.end_step for s in state.scripts],
                     transcripts=[list(s.transcript) for s in state.scripts],
                     consumption_times=[list(s.consumption_times) for s in state.scripts],
                     logged_text=state.logged)
