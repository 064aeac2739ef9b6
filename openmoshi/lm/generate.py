"""Streaming generation with the Moshi LM, one 80 ms frame per step, as plain functions.

    state = init_state(lm, batch_size, sampling)
    out = step(lm, state, user_codes)    # user_codes [B, n_q - dep_q] for one frame
    out.text [B], out.audio [B, gen_q], out.valid [B]
    out = step(lm, state, user_codes, forced=tokens)   # forced [B, 1 + gen_q], NOT_FORCED where sampled
    set_condition(state, lm.condition_sum([{"description": "very_good"}] * B))  # conditioned LMs

Classifier-free guidance (`init_state(..., cfg_coef=3.0)`, conditioned LMs): the transformers run
2B rows, slot b's own condition in row 2b and a negative one in row 2b + 1 (`set_condition(...,
negative=...)`), fed the same tokens; the logits sampled are null + (cond - null) * cfg_coef, as
the official LMGen computes them. Interleaved, the rows of slots [0, n) are the rows [0, 2n): a
prefix of slots is a prefix of rows (`state.prefix(n)`).

Forced tokens: a token given in `forced` for a slot and a stream replaces the one the step would
sample there: it is what the depth transformer reads as the previous codebook, what the cache (and
so the next steps) hold, and what the step returns for that frame. `forced` is in frame time, the
frame whose text this step samples (the user's frame of the next step): stream k's token lands at
delayed position offset + 1 + delays[k], so a delayed stream's forced token is used a step later.
PersonaPlex (`LMConfig.depformer_user_slots`) forces the user's depth slots this way in its own
code; here they are not computed at all: the depth transformer is causal and they come after the
model's codebooks, so they cannot change what the model samples.

Dimension glossary: B batch (slots), K streams (1 text + n_q audio), Q gen_q (the audio codebooks
the model generates: dep_q but for PersonaPlex), C ring length.

The streams are read with their delays: a step writes the user's codes and the model's sampled
tokens into a small ring buffer of frames (`cache` [B, K, C]) at their delayed positions, and
returns the frame whose every stream is complete, i.e. `max(delays)` steps back (`valid` is False
until a slot has produced that many steps). Every slot has its own position, so a slot can be
reset (`state.reset(mask)`) or left idle (`active`) without disturbing the others. All state is
preallocated and updated in place, and nothing in `step` waits on the device: the step can be
captured in a CUDA graph as it is.

The state is a `GenState` of slot states split by concern (`openmoshi.modules.slots`: each field
declares its batch axis and reset value, and prefix / move / reset / save_slot follow from that):
`streams` (the token rings and positions), `sampler` (per-slot settings, random streams, text
history, and the host's flags, one object shared by every prefix), `guidance` (condition rows and
cfg_coef), the `temporal` and `depth` transformers' caches over the rows, and `calls`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmoshi.errors import UserError
from openmoshi.lm.config import UNGENERATED_TOKEN, ZERO_TOKEN
from openmoshi.lm.model import LMModel
from openmoshi.lm.sampling import (TEXT_HISTORY, SamplingConfig, push_text_history, sample, shape_text_logits,
                                   slot_exponentials)
from openmoshi.modules.slots import SlotState, Snapshot, host, nested, per_row, per_slot, scratch, shared  # noqa: F401
from openmoshi.modules.transformer import Transformer, TransformerState

NOT_FORCED = UNGENERATED_TOKEN  # in `forced`: sample this token


@dataclass
class Streams(SlotState):
    """The token streams by delayed position: a ring of C frames per slot (see the module doc)."""

    cache: torch.Tensor = per_slot(reset=UNGENERATED_TOKEN)  # [B, K, C] long, UNGENERATED_TOKEN when unknown
    forced: torch.Tensor = per_slot(reset=NOT_FORCED)  # [B, 1 + Q, C] long, tokens waiting for their step
    offset: torch.Tensor = per_slot(reset=0)  # [B] long, steps done by each slot
    initial: torch.Tensor = shared()  # [1, K, 1] long, tokens read before a stream has started
    delays: torch.Tensor = shared()  # [K] long


@dataclass
class SamplerFlags:
    """What the host knows of every slot's sampler without a sync (`set_sampling` keeps it): one
    object shared by a state and all its prefixes, so that no view holds stale flags. The flags
    choose the code a step runs (`cuda_graph.GraphedStep` keys its graphs on them)."""

    max_k: int  # top-k width computed for every slot
    max_k_text: int
    greedy_text: bool = False  # every slot decodes text greedily: skip the sampler
    greedy_audio: bool = False
    shaped_text: bool = False  # some slot shapes its text (repetition penalty, pad_mult)


@dataclass
class Sampler(SlotState):
    """Each slot's sampling settings, its random streams and the text history that shaping reads."""

    temp: torch.Tensor = per_slot()  # [B] float, audio temperature (<= 0: greedy)
    top_k: torch.Tensor = per_slot()  # [B] long
    temp_text: torch.Tensor = per_slot()  # [B] float
    top_k_text: torch.Tensor = per_slot()  # [B] long
    # Text shaping (SamplingConfig.repetition_penalty/_context, pad_mult) and the ring of each
    # slot's recent non-padding text tokens.
    rep_penalty: torch.Tensor = per_slot()  # [B] float
    rep_context: torch.Tensor = per_slot()  # [B] long
    pad_mult: torch.Tensor = per_slot()  # [B] float
    text_history: torch.Tensor = per_slot(reset=-1)  # [B, TEXT_HISTORY] long, -1 where empty
    text_count: torch.Tensor = per_slot(reset=0)  # [B] long, tokens pushed since the slot's reset
    # Per-slot random streams (`init_state(..., slot_streams=True)`): each slot samples from its own
    # seeds, so its tokens do not depend on the other slots or on its row. None: one generator.
    seeds: torch.Tensor | None = per_slot()  # [B, 2] long: text seed, audio seed
    draws: torch.Tensor | None = per_slot(reset=0)  # [B, 2] long: draws taken from each stream
    flags: SamplerFlags = shared()


@dataclass
class Guidance(SlotState):
    """What steers the model: each slot's condition, and classifier-free guidance (two rows per slot)."""

    condition: torch.Tensor | None = per_row()  # [B', 1, D] model dtype, added to the input; None: unconditioned
    cfg_coef: float = host()  # != 1: classifier-free guidance, each slot's condition and negative rows

    @property
    def guided(self) -> bool:
        return self.cfg_coef != 1.0

    @property
    def rows_per_slot(self) -> int:
        return 2 if self.guided else 1


@dataclass
class GenState(SlotState):
    """Everything a step reads and writes, per slot; `prefix`, `move`, `reset`, `save_slot` as
    every slot state (`openmoshi.modules.slots`)."""

    streams: Streams = nested()
    sampler: Sampler = nested()
    guidance: Guidance = nested()
    temporal: TransformerState = nested(rows=True)
    depth: TransformerState | None = scratch(rows=True)  # `depth_step` resets it before every frame
    calls: int = host(0)  # eager `step` calls since init: no slot is further along (no sync)

    @property
    def rows_per_slot(self) -> int:
        return self.guidance.rows_per_slot

    @property
    def batch_size(self) -> int:
        return self.streams.offset.shape[0]

    @property
    def guided(self) -> bool:
        return self.guidance.cfg_coef != 1.0  # read a few times per step: no second property call


@dataclass
class StepOutput:
    text: torch.Tensor  # [B] long, text token of the returned frame
    audio: torch.Tensor  # [B, Q] long, the model's audio codes of the returned frame
    valid: torch.Tensor  # [B] bool, False while a slot has not yet produced a complete frame
    # [B, H, E] float32, the extra heads' probabilities at this step (`LMModel.extra_probs`: Kyutai
    # STT's pause heads), of the step itself, not of the delayed frame; None without extra heads.
    prs: torch.Tensor | None = None


def init_state(lm: LMModel, batch_size: int, sampling: SamplingConfig = SamplingConfig(),
               max_k: int | None = None, max_k_text: int | None = None, cfg_coef: float = 1.0,
               slot_streams: bool = False, device=None, cross_len: int = 0) -> GenState:
    """Fresh state for `batch_size` slots. `max_k`/`max_k_text` bound the per-slot top-k (default:
    the sampling config's values). `cfg_coef` != 1: classifier-free guidance (conditioned LMs).
    `slot_streams`: each slot draws from its own seeded streams (`set_seeds`) rather than from the
    generator given to `step` (the official sampler's stream, for parity). `device`: the model's
    by default; "meta" sizes the state without allocating it (`state_bytes`). `cross_len`: the
    length of the cross-attention source (Kyutai TTS, see `Transformer.set_cross`)."""
    cfg = lm.cfg
    param = lm.text_emb.weight  # never swapped by the speed wrappers
    device, dtype = param.device if device is None else torch.device(device), param.dtype
    K, C = cfg.num_codebooks, cfg.max_delay + 2
    if cfg_coef != 1.0 and lm.condition_provider is None:
        raise UserError("classifier-free guidance (cfg_coef != 1) needs a conditioned model "
                        "(config keys 'conditioners'/'fuser', e.g. Hibiki); use cfg_coef=1")
    rows = 2 * batch_size if cfg_coef != 1.0 else batch_size  # the transformers' batch

    def full(shape, value, dtype=torch.long):
        return torch.full(shape, value, dtype=dtype, device=device)

    streams = Streams(cache=full((batch_size, K, C), UNGENERATED_TOKEN),
                      forced=full((batch_size, cfg.gen_q + 1, C), NOT_FORCED),
                      offset=full((batch_size,), 0),
                      initial=lm.initial_tokens(device).view(1, K, 1),
                      delays=torch.tensor(cfg.delays, dtype=torch.long, device=device))
    flags = SamplerFlags(max_k=min(max_k or sampling.top_k, cfg.card),
                         max_k_text=min(max_k_text or sampling.top_k_text, cfg.text_out_card))
    sampler = Sampler(temp=full((batch_size,), 0.0, torch.float), top_k=full((batch_size,), 0),
                      temp_text=full((batch_size,), 0.0, torch.float), top_k_text=full((batch_size,), 0),
                      rep_penalty=full((batch_size,), 1.0, torch.float), rep_context=full((batch_size,), 0),
                      pad_mult=full((batch_size,), 0.0, torch.float),
                      text_history=full((batch_size, TEXT_HISTORY), -1), text_count=full((batch_size,), 0),
                      seeds=full((batch_size, 2), 0) if slot_streams else None,
                      draws=full((batch_size, 2), 0) if slot_streams else None, flags=flags)
    condition = None
    if lm.condition_provider is not None:
        condition = torch.zeros(rows, 1, cfg.dim, device=device, dtype=dtype)
    state = GenState(
        streams=streams, sampler=sampler, guidance=Guidance(condition=condition, cfg_coef=float(cfg_coef)),
        temporal=lm.transformer.init_state(rows, device=device, dtype=dtype, capacity=None if cfg.context else 4096,
                                           cross_len=cross_len),
        depth=None if lm.depformer is None else lm.depformer.init_state(rows, device=device, dtype=dtype,
                                                                          capacity=cfg.gen_q))
    set_sampling(state, sampling)
    return state


NOMINAL_CROSS_LEN = 5 * 125  # a cross-attention source of the released TTS voices: 5 speakers x 125 frames


def state_bytes(lm: LMModel, batch_size: int, cfg_coef: float = 1.0) -> int:
    """What `init_state(lm, batch_size, cfg_coef=..., slot_streams=True)` allocates for its slots
    (the server's states), in bytes, sized on the meta device: almost all of it the temporal
    transformer's KV cache at its full context (plus, with cross-attention, the keys and values of
    a source of NOMINAL_CROSS_LEN)."""
    cross_len = NOMINAL_CROSS_LEN if lm.cfg.cross_attention else 0
    return init_state(lm, batch_size, cfg_coef=cfg_coef, slot_streams=True, device="meta", cross_len=cross_len).nbytes


def set_seeds(state: GenState, text_seed: int, audio_seed: int, mask: torch.Tensor | None = None) -> None:
    """Seeds the text and audio streams of the slots in `mask` (all when None) and rewinds them."""
    sampler = state.sampler
    if sampler.seeds is None:
        raise ValueError("this state samples from one generator: init_state(..., slot_streams=True)")
    seeds = torch.tensor([text_seed, audio_seed], device=sampler.seeds.device)
    if mask is None:
        sampler.seeds.copy_(seeds.expand_as(sampler.seeds))
        sampler.draws.zero_()
    else:
        mask = mask.to(sampler.seeds.device)[:, None]
        sampler.seeds.copy_(torch.where(mask, seeds, sampler.seeds))
        sampler.draws.masked_fill_(mask, 0)


def kept_draws(sampler: Sampler, active: torch.Tensor | None) -> torch.Tensor | None:
    """The per-slot streams' draw counts before a step with idle slots (`restore_draws` after it):
    an idle slot computes, samples and throws away, and must not use up its random stream, or
    what it says would depend on how long it sat idle beside others."""
    if active is None or sampler.draws is None:
        return None
    return sampler.draws.clone()


def restore_draws(sampler: Sampler, active: torch.Tensor | None, before: torch.Tensor | None) -> None:
    if before is not None:
        sampler.draws.copy_(torch.where(active.to(before.device)[:, None], sampler.draws, before))


def _sample(sampler: Sampler, stream: int, logits: torch.Tensor, temp, top_k, max_k: int, generator) -> torch.Tensor:
    """sample() with the per-slot stream `stream` (0 text, 1 audio) when the sampler has them."""
    noise = None
    if sampler.seeds is not None:
        noise = slot_exponentials(sampler.seeds[:, stream], sampler.draws[:, stream], max_k)
        sampler.draws[:, stream] += max_k
    return sample(logits, temp, top_k, max_k, generator, noise)


def set_sampling(state: GenState, sampling: SamplingConfig, mask: torch.Tensor | None = None) -> None:
    """Sets the sampling settings of the slots in `mask` (all when None). top-k is capped at max_k."""
    sampler, flags = state.sampler, state.sampler.flags
    for target, value in ((sampler.temp, sampling.temp), (sampler.top_k, min(sampling.top_k, flags.max_k)),
                          (sampler.temp_text, sampling.temp_text),
                          (sampler.top_k_text, min(sampling.top_k_text, flags.max_k_text)),
                          (sampler.rep_penalty, sampling.repetition_penalty),
                          (sampler.rep_context, sampling.repetition_context), (sampler.pad_mult, sampling.pad_mult)):
        if mask is None:
            target.fill_(value)
        else:
            target.masked_fill_(mask.to(target.device), value)
    # Known on the host without a sync: all greedy after a full setting, or while only greedy
    # settings have been added since; some slot shapes its text once one was set to.
    flags.greedy_text = sampling.temp_text <= 0 and (mask is None or flags.greedy_text)
    flags.greedy_audio = sampling.temp <= 0 and (mask is None or flags.greedy_audio)
    flags.shaped_text = sampling.shapes_text or (mask is not None and flags.shaped_text)


def set_condition(state: GenState, condition: torch.Tensor, mask: torch.Tensor | None = None,
                  negative: torch.Tensor | None = None) -> None:
    """Sets the condition of the slots in `mask` (all when None), e.g. from
    `lm.condition_sum([{"description": "very_good"}] * B)`. condition: [B, 1, D] or [1, 1, D].
    Like the sampling settings, a slot keeps its condition across `state.reset`; slots never set
    add zeros (an unconditioned input, which is not the model's learnt "no condition": for that,
    pass the value None to `lm.condition_sum`). With classifier-free guidance, `negative` (same
    shapes, e.g. the "very_bad" description) is what the guidance steers away from."""
    target = state.guidance.condition
    if target is None:
        raise ValueError("this model has no conditioners (config keys 'conditioners'/'fuser')")
    if state.guided != (negative is not None):
        raise ValueError("classifier-free guidance needs a negative condition (set_condition(..., negative=...)), "
                         "and only guidance uses one" if state.guided else
                         "a negative condition is for classifier-free guidance: init_state(..., cfg_coef=...)")
    B, D = state.batch_size, target.shape[-1]
    for name, c in (("condition", condition), ("negative", negative)):
        if c is not None and (c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1:] != (1, D)):
            raise ValueError(f"{name} must be [{B} or 1, 1, {D}], got {tuple(c.shape)}")
    parts = [condition] if negative is None else [condition, negative]
    value = torch.stack([c.to(target.device, target.dtype).expand(B, 1, D) for c in parts],
                        dim=1).view(-1, 1, D)  # [B', 1, D], a slot's rows side by side
    if mask is None:
        target.copy_(value)
    else:
        rows = _rows(state, mask.to(value.device))
        target.copy_(torch.where(rows[:, None, None], value, target))


def _rows(state: GenState, per_slot: torch.Tensor) -> torch.Tensor:
    """A per-slot [B, ...] tensor as the transformers' rows: each slot twice with guidance."""
    return per_slot.repeat_interleave(2, dim=0) if state.guided else per_slot


def _guide(state: GenState, logits: torch.Tensor) -> torch.Tensor:
    """[2B, ...] -> [B, ...]: null + (cond - null) * cfg_coef, in the logits' dtype as the official
    LMGen; [B, ...] unchanged without guidance."""
    if not state.guided:
        return logits
    pairs = logits.view(-1, 2, *logits.shape[1:])
    cond, null = pairs[:, 0], pairs[:, 1]
    return null + (cond - null) * state.guidance.cfg_coef


def read_window(calls: int, state: GenState) -> int:
    """Cache slots the temporal transformer must read at the (calls + 1)-th step since init."""
    return Transformer.read_window(calls, state.temporal.capacity)


def check_codes(codes: torch.Tensor, card: int, name: str = "codes") -> None:
    """Audio codes must be integers in [0, card), or ZERO_TOKEN (-1) for "no input", or card itself
    (the initial token, which Hibiki also reads as "end of the input stream")."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {codes.dtype}")
    bad = (codes < ZERO_TOKEN) | (codes > card)
    if bool(bad.any()):
        value = codes[bad][0].item()
        raise ValueError(f"{name} holds {value}, outside [0, {card}) (or -1 for no input, {card} for end of input)")


def check_forced(forced: torch.Tensor, cfg, batch_size: int) -> None:
    """Forced tokens: [B, 1 + gen_q] integers, each NOT_FORCED or a token of its stream."""
    shape = (batch_size, cfg.gen_q + 1)
    if forced.dtype.is_floating_point or forced.dtype == torch.bool or tuple(forced.shape) != shape:
        raise ValueError(f"forced must be an integer tensor of shape {list(shape)} (text, then the "
                         f"model's audio codebooks), got {forced.dtype} {list(forced.shape)}")
    limits = torch.tensor([cfg.text_card] + [cfg.card] * cfg.gen_q, device=forced.device)
    bad = (forced != NOT_FORCED) & ((forced < 0) | (forced >= limits))
    if bool(bad.any()):
        b, k = bad.nonzero()[0].tolist()
        raise ValueError(f"forced[{b}, {k}] = {forced[b, k].item()} is outside [0, {limits[k].item()}) "
                         f"(or {NOT_FORCED} for not forced)")


def _write(cache: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, active: torch.Tensor | None) -> None:
    """cache[b, k, positions[b, k]] = values[b, k] for active slots. cache [B, K', C], positions/values [B, K']."""
    positions, values = positions[..., None], values[..., None]
    if active is not None:
        values = torch.where(active[:, None, None], values, cache.gather(2, positions))
    cache.scatter_(2, positions, values)


@torch.no_grad()
def step(lm: LMModel, state: GenState, user_codes: torch.Tensor, active: torch.Tensor | None = None,
         generator: torch.Generator | None = None, check: bool = True,
         attend: int | None | str = "auto", forced: torch.Tensor | None = None,
         embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
    """One frame for every slot. user_codes [B, Ku] with Ku >= n_q - gen_q (extra codebooks are
    ignored). Slots where `active` [B] is False compute but change nothing (idle conversations).
    `forced` [B, 1 + gen_q]: tokens that replace the sampled ones, NOT_FORCED elsewhere (see the
    module doc for which frame they belong to). `embeddings` (x [B, 1, D], use [B] bool): the
    temporal transformer's input for the slots in `use`, instead of their tokens' (`persona.Preset`).

    `check` validates the codes' range, which waits on the device: fast paths that feed codes
    straight from Mimi pass check=False. `attend` bounds the KV-cache slots the temporal
    transformer reads: "auto" derives it from `state.calls` (right for eager use), None reads the
    whole ring. A captured CUDA graph freezes host-side values: a replay does not advance
    `state.calls`, and the greedy flags set by `set_sampling` choose the code it records, so a
    graphed caller passes `read_window(n, state)` for its own count n of steps and keys its
    graphs on that window and the flags (`cuda_graph.GraphedStep` does both)."""
    if attend == "auto":
        attend = read_window(state.calls, state)
    state.calls += 1
    cfg = lm.cfg
    streams, sampler, flags = state.streams, state.sampler, state.sampler.flags
    draws = kept_draws(sampler, active)
    Q, C = cfg.gen_q, streams.cache.shape[2]
    if user_codes.dim() != 2:
        raise ValueError(f"user_codes must be [batch, codebooks], got shape {tuple(user_codes.shape)}")
    B, Ku = user_codes.shape
    if B != state.batch_size:
        raise ValueError(f"user_codes has batch {B}, the state was made for {state.batch_size}")
    if Ku < cfg.num_user_codebooks:
        raise ValueError(f"user_codes has {Ku} codebooks, the model reads {cfg.num_user_codebooks}")
    user_codes = user_codes[:, :cfg.num_user_codebooks].to(streams.cache.device)
    if check:
        check_codes(user_codes, cfg.card, "user_codes")
    if forced is not None:
        forced = forced.to(streams.cache.device)
        if check:
            check_forced(forced, cfg, B)
        # Each forced token waits at its delayed position for the step that produces it.
        at = (streams.offset[:, None] + 1 + streams.delays[:Q + 1]) % C  # [B, 1 + Q]
        given = forced != NOT_FORCED
        if active is not None:
            given = given & active[:, None]
        streams.forced.scatter_(2, at[..., None], torch.where(given, forced, streams.forced.gather(2, at[..., None])[..., 0])[..., None])
    target = ((streams.offset + 1) % C)[:, None].expand(B, Q + 1)  # the position this step produces
    pending = streams.forced.gather(2, target[..., None])[..., 0]  # [B, 1 + Q]

    # The user's codes of this frame go where their delayed streams will read them.
    user_delays = streams.delays[Q + 1:]
    _write(streams.cache[:, Q + 1:], (streams.offset[:, None] + user_delays) % C, user_codes, active)

    # Read this step's tokens; streams that have not started yet read the initial token.
    not_started = streams.offset[:, None, None] <= streams.delays[None, :, None]  # [B, K, 1]
    if active is not None:
        not_started = not_started | ~active[:, None, None]
    index = (streams.offset % C)[:, None, None].expand(B, cfg.num_codebooks, 1)
    tokens = torch.where(not_started, streams.initial, streams.cache.gather(2, index))  # [B, K, 1]

    tokens = _rows(state, tokens)  # with guidance, both rows of a slot read its tokens
    rows_active = None if active is None else _rows(state, active)
    if embeddings is not None:
        embeddings = (_rows(state, embeddings[0]), _rows(state, embeddings[1]))
    hidden, text_logits = lm.forward_text(tokens, state.temporal, rows_active, state.guidance.condition, attend,
                                          embeddings)  # [B', 1, D], [B', 1, N]
    text_logits = _guide(state, text_logits)[:, 0]  # [B, N]
    if flags.shaped_text:
        text_logits = shape_text_logits(text_logits, sampler.text_history, sampler.text_count, sampler.rep_penalty,
                                        sampler.rep_context, sampler.pad_mult, cfg.existing_text_padding_id)
    if flags.greedy_text:
        text = text_logits.argmax(dim=-1)
    else:
        text = _sample(sampler, 0, text_logits, sampler.temp_text, sampler.top_k_text, flags.max_k_text, generator)
    text = torch.where(pending[:, 0] != NOT_FORCED, pending[:, 0], text)
    if flags.shaped_text:
        push_text_history(sampler.text_history, sampler.text_count, text,
                          (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id), active)
    audio = depth_step(lm, state, text, hidden, generator, pending[:, 1:]) if Q else None
    _write(streams.forced, target, torch.full_like(pending, NOT_FORCED), active)  # used: free the positions

    if active is None:
        streams.offset.add_(1)
    else:
        streams.offset.add_(active.long())
    position = (streams.offset % C)[:, None]  # [B, 1]
    produced = text[:, None] if audio is None else torch.cat([text[:, None], audio], dim=1)  # [B, 1 + Q]
    _write(streams.cache[:, :Q + 1], position.expand(B, Q + 1), produced, active)

    # The frame max_delay steps back is now complete in every generated stream.
    back = (streams.offset[:, None] - cfg.max_delay + streams.delays[:Q + 1]) % C  # [B, 1 + Q]
    frame = streams.cache[:, :Q + 1].gather(2, back[..., None])[..., 0]  # [B, 1 + Q]
    valid = streams.offset > cfg.max_delay
    if active is not None:
        valid = valid & active
    prs = lm.extra_probs(hidden[::state.rows_per_slot, 0])  # a slot's own row under guidance
    restore_draws(sampler, active, draws)
    return StepOutput(text=frame[:, 0], audio=frame[:, 1:], valid=valid, prs=prs)


def depth_step(lm: LMModel, state: GenState, text: torch.Tensor, hidden: torch.Tensor,
               generator: torch.Generator | None = None, forced: torch.Tensor | None = None,
               num: int | None = None) -> torch.Tensor:
    """The depth transformer samples the frame's gen_q audio codebooks in order. text [B] -> [B, Q].
    hidden [B', 1, D]: B' = 2B rows with guidance. forced [B, Q]: tokens that replace the sampled
    ones (NOT_FORCED where none), read as the previous codebook by the next depth step. `num`:
    only the first `num` codebooks (Q = num; Kyutai TTS's n_q)."""
    depth, sampler, flags = state.depth, state.sampler, state.sampler.flags
    depth.reset()  # nothing of the last frame's codebooks is read again
    prev, out = text[:, None], []  # [B, 1]
    for q in range(lm.cfg.gen_q if num is None else num):
        x = lm.depformer_input(q, _rows(state, prev), hidden)  # [B', 1, Dd]
        y = lm.depformer(x, depth, step=q)
        logits = _guide(state, lm.depformer_logits(q, y)[:, 0])  # [B, card]
        if flags.greedy_audio:
            token = logits.argmax(dim=-1)
        else:
            token = _sample(sampler, 1, logits, sampler.temp, sampler.top_k, flags.max_k, generator)
        if forced is not None:
            token = torch.where(forced[:, q] != NOT_FORCED, forced[:, q], token)
        out.append(token)
        prev = token[:, None]
    return torch.stack(out, dim=1)
