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
prefix of slots is a prefix of rows (`prefix`).

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
reset (`reset_slots`) or left idle (`active`) without disturbing the others. All state is
preallocated and updated in place, and nothing in `step` waits on the device: the step can be
captured in a CUDA graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from openmoshi.lm.config import UNGENERATED_TOKEN, ZERO_TOKEN
from openmoshi.lm.model import LMModel
from openmoshi.lm.sampling import (TEXT_HISTORY, SamplingConfig, push_text_history, sample, shape_text_logits,
                                   slot_exponentials)
from openmoshi.modules.transformer import Transformer, TransformerState

NOT_FORCED = UNGENERATED_TOKEN  # in `forced`: sample this token


@dataclass
class GenState:
    cache: torch.Tensor  # [B, K, C] long, tokens by delayed position, UNGENERATED_TOKEN when unknown
    offset: torch.Tensor  # [B] long, steps done by each slot
    initial: torch.Tensor  # [1, K, 1] long, tokens read before a stream has started
    delays: torch.Tensor  # [K] long
    temporal: TransformerState
    depth: TransformerState | None
    temp: torch.Tensor  # [B] float, audio temperature (<= 0: greedy)
    top_k: torch.Tensor  # [B] long
    temp_text: torch.Tensor  # [B] float
    top_k_text: torch.Tensor  # [B] long
    max_k: int  # top-k width computed for every slot
    max_k_text: int
    condition: torch.Tensor | None = None  # [B, 1, D] model dtype, added to the input; None: unconditioned model
    calls: int = 0  # eager `step` calls since init: no slot is further along (host-side, no sync)
    greedy_text: bool = False  # host-side: every slot decodes text greedily, so skip the sampler
    greedy_audio: bool = False
    cfg_coef: float = 1.0  # classifier-free guidance: != 1 doubles the transformers' rows
    # Per-slot random streams (`init_state(..., slot_streams=True)`): each slot samples from its own
    # seeds, so its tokens do not depend on the other slots or on its row. None: one generator.
    seeds: torch.Tensor | None = None  # [B, 2] long: text seed, audio seed
    draws: torch.Tensor | None = None  # [B, 2] long: draws taken from each stream
    # Forced tokens waiting for the step that produces their position (see the module doc).
    forced: torch.Tensor | None = None  # [B, 1 + Q, C] long by delayed position, NOT_FORCED when free
    # Text shaping (SamplingConfig.repetition_penalty/_context, pad_mult), per slot; the ring of
    # each slot's recent non-padding text tokens. `shaped_text` (host-side): some slot shapes.
    rep_penalty: torch.Tensor | None = None  # [B] float
    rep_context: torch.Tensor | None = None  # [B] long
    pad_mult: torch.Tensor | None = None  # [B] float
    text_history: torch.Tensor | None = None  # [B, TEXT_HISTORY] long, -1 where empty
    text_count: torch.Tensor | None = None  # [B] long, tokens pushed since the slot's reset
    shaped_text: bool = False

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    @property
    def guided(self) -> bool:
        return self.cfg_coef != 1.0


@dataclass
class StepOutput:
    text: torch.Tensor  # [B] long, text token of the returned frame
    audio: torch.Tensor  # [B, Q] long, the model's audio codes of the returned frame
    valid: torch.Tensor  # [B] bool, False while a slot has not yet produced a complete frame


def init_state(lm: LMModel, batch_size: int, sampling: SamplingConfig = SamplingConfig(),
               max_k: int | None = None, max_k_text: int | None = None, cfg_coef: float = 1.0,
               slot_streams: bool = False) -> GenState:
    """Fresh state for `batch_size` slots. `max_k`/`max_k_text` bound the per-slot top-k (default:
    the sampling config's values). `cfg_coef` != 1: classifier-free guidance (conditioned LMs).
    `slot_streams`: each slot draws from its own seeded streams (`set_seeds`) rather than from the
    generator given to `step` (the official sampler's stream, for parity)."""
    cfg = lm.cfg
    param = lm.text_emb.weight  # never swapped by the speed wrappers
    device, dtype = param.device, param.dtype
    K, C = cfg.num_codebooks, cfg.max_delay + 2
    if cfg_coef != 1.0 and lm.condition_provider is None:
        raise ValueError("classifier-free guidance (cfg_coef != 1) needs a conditioned model "
                         "(config keys 'conditioners'/'fuser', e.g. Hibiki); use cfg_coef=1")
    rows = 2 * batch_size if cfg_coef != 1.0 else batch_size  # the transformers' batch
    depth = None
    if lm.depformer is not None:
        depth = lm.depformer.init_state(rows, device=device, dtype=dtype, capacity=cfg.gen_q)
    state = GenState(
        cache=torch.full((batch_size, K, C), UNGENERATED_TOKEN, dtype=torch.long, device=device),
        offset=torch.zeros(batch_size, dtype=torch.long, device=device),
        initial=lm.initial_tokens(device).view(1, K, 1),
        delays=torch.tensor(cfg.delays, dtype=torch.long, device=device),
        temporal=lm.transformer.init_state(rows, device=device, dtype=dtype,
                                           capacity=None if cfg.context else 4096),
        depth=depth,
        temp=torch.empty(batch_size, device=device), top_k=torch.empty(batch_size, dtype=torch.long, device=device),
        temp_text=torch.empty(batch_size, device=device),
        top_k_text=torch.empty(batch_size, dtype=torch.long, device=device),
        max_k=min(max_k or sampling.top_k, cfg.card), max_k_text=min(max_k_text or sampling.top_k_text, cfg.text_out_card),
        cfg_coef=float(cfg_coef),
        forced=torch.full((batch_size, cfg.gen_q + 1, C), NOT_FORCED, dtype=torch.long, device=device),
        rep_penalty=torch.ones(batch_size, device=device),
        rep_context=torch.zeros(batch_size, dtype=torch.long, device=device),
        pad_mult=torch.zeros(batch_size, device=device),
        text_history=torch.full((batch_size, TEXT_HISTORY), -1, dtype=torch.long, device=device),
        text_count=torch.zeros(batch_size, dtype=torch.long, device=device))
    if lm.condition_provider is not None:
        state.condition = torch.zeros(rows, 1, cfg.dim, device=device, dtype=dtype)
    if slot_streams:
        state.seeds = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
        state.draws = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    set_sampling(state, sampling)
    return state


def state_bytes(lm: LMModel, batch_size: int, cfg_coef: float = 1.0) -> int:
    """What `init_state(lm, batch_size, cfg_coef=...)` allocates, in bytes, without allocating it:
    almost all of it the temporal transformer's KV cache at its full context."""
    cfg = lm.cfg
    rows = 2 * batch_size if cfg_coef != 1.0 else batch_size
    elem = lm.text_emb.weight.element_size()
    total = 0
    for t, capacity in ((cfg.temporal, cfg.context or 4096), (cfg.depth if cfg.gen_q else None, cfg.gen_q)):
        if t is None:
            continue
        kv = rows * (t.num_heads // t.kv_repeat) * capacity * t.head_dim * elem
        total += 2 * t.num_layers * kv + rows * (capacity + 1) * 8  # keys and values; positions
    total += batch_size * (cfg.num_codebooks * (cfg.max_delay + 2) + 1 + 2 + 2 + 3) * 8  # cache, offset, seeds, draws, sampling
    total += batch_size * (cfg.gen_q + 1) * (cfg.max_delay + 2) * 8  # forced tokens
    total += batch_size * ((TEXT_HISTORY + 2) * 8 + 2 * 4)  # text shaping: history, count, context; penalty, pad
    if lm.condition_provider is not None:
        total += rows * cfg.dim * elem
    return total


def set_seeds(state: GenState, text_seed: int, audio_seed: int, mask: torch.Tensor | None = None) -> None:
    """Seeds the text and audio streams of the slots in `mask` (all when None) and rewinds them."""
    if state.seeds is None:
        raise ValueError("this state samples from one generator: init_state(..., slot_streams=True)")
    seeds = torch.tensor([text_seed, audio_seed], device=state.seeds.device)
    if mask is None:
        state.seeds.copy_(seeds.expand_as(state.seeds))
        state.draws.zero_()
    else:
        mask = mask.to(state.seeds.device)[:, None]
        state.seeds.copy_(torch.where(mask, seeds, state.seeds))
        state.draws.masked_fill_(mask, 0)


def _sample(state: GenState, stream: int, logits: torch.Tensor, temp, top_k, max_k: int, generator) -> torch.Tensor:
    """sample() with the state's per-slot stream `stream` (0 text, 1 audio) when it has them."""
    noise = None
    if state.seeds is not None:
        noise = slot_exponentials(state.seeds[:, stream], state.draws[:, stream], max_k)
        state.draws[:, stream] += max_k
    return sample(logits, temp, top_k, max_k, generator, noise)


def set_sampling(state: GenState, sampling: SamplingConfig, mask: torch.Tensor | None = None) -> None:
    """Sets the sampling settings of the slots in `mask` (all when None). top-k is capped at max_k."""
    for name, max_k in (("temp", None), ("top_k", state.max_k), ("temp_text", None), ("top_k_text", state.max_k_text)):
        value = getattr(sampling, name)
        if max_k is not None:
            value = min(value, max_k)
        target = getattr(state, name)
        if mask is None:
            target.fill_(value)
        else:
            target.masked_fill_(mask.to(target.device), value)
    # Known on the host without a sync: all greedy after a full setting, or while only greedy
    # settings have been added since.
    state.greedy_text = sampling.temp_text <= 0 and (mask is None or state.greedy_text)
    if state.rep_penalty is not None:
        for target, value in ((state.rep_penalty, sampling.repetition_penalty),
                              (state.rep_context, sampling.repetition_context), (state.pad_mult, sampling.pad_mult)):
            if mask is None:
                target.fill_(value)
            else:
                target.masked_fill_(mask.to(target.device), value)
        state.shaped_text = sampling.shapes_text or (mask is not None and state.shaped_text)
    state.greedy_audio = sampling.temp <= 0 and (mask is None or state.greedy_audio)


def set_condition(state: GenState, condition: torch.Tensor, mask: torch.Tensor | None = None,
                  negative: torch.Tensor | None = None) -> None:
    """Sets the condition of the slots in `mask` (all when None), e.g. from
    `lm.condition_sum([{"description": "very_good"}] * B)`. condition: [B, 1, D] or [1, 1, D].
    Like the sampling settings, a slot keeps its condition across `reset_slots`; slots never set
    add zeros (an unconditioned input, which is not the model's learnt "no condition": for that,
    pass the value None to `lm.condition_sum`). With classifier-free guidance, `negative` (same
    shapes, e.g. the "very_bad" description) is what the guidance steers away from."""
    if state.condition is None:
        raise ValueError("this model has no conditioners (config keys 'conditioners'/'fuser')")
    if state.guided != (negative is not None):
        raise ValueError("classifier-free guidance needs a negative condition (set_condition(..., negative=...)), "
                         "and only guidance uses one" if state.guided else
                         "a negative condition is for classifier-free guidance: init_state(..., cfg_coef=...)")
    B, D = state.batch_size, state.condition.shape[-1]
    for name, c in (("condition", condition), ("negative", negative)):
        if c is not None and (c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1:] != (1, D)):
            raise ValueError(f"{name} must be [{B} or 1, 1, {D}], got {tuple(c.shape)}")
    parts = [condition] if negative is None else [condition, negative]
    value = torch.stack([c.to(state.condition.device, state.condition.dtype).expand(B, 1, D) for c in parts],
                        dim=1).view(-1, 1, D)  # [B', 1, D], a slot's rows side by side
    if mask is None:
        state.condition.copy_(value)
    else:
        rows = _rows(state, mask.to(value.device))
        state.condition.copy_(torch.where(rows[:, None, None], value, state.condition))


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
    return null + (cond - null) * state.cfg_coef


def prefix(state: GenState, n: int) -> GenState:
    """Slots [0, n) of `state` as views: a step on it updates `state` in place, and computes only
    what those slots need. Host-side fields (calls, the greedy flags) are copies: the caller keeps
    them current (the server passes positions to `GraphedStep` and copies the flags)."""
    rows = 2 * n if state.guided else n
    return replace(state, cache=state.cache[:n], offset=state.offset[:n], temporal=state.temporal.prefix(rows),
                   depth=None if state.depth is None else state.depth.prefix(rows),
                   temp=state.temp[:n], top_k=state.top_k[:n], temp_text=state.temp_text[:n],
                   top_k_text=state.top_k_text[:n],
                   condition=None if state.condition is None else state.condition[:rows],
                   seeds=None if state.seeds is None else state.seeds[:n],
                   draws=None if state.draws is None else state.draws[:n],
                   forced=None if state.forced is None else state.forced[:n],
                   **{name: None if getattr(state, name) is None else getattr(state, name)[:n]
                      for name in ("rep_penalty", "rep_context", "pad_mult", "text_history", "text_count")})


def move_slot(state: GenState, src: int, dst: int) -> None:
    """Slot `dst` takes over slot `src`'s conversation: stream positions, tokens, caches, sampling
    settings and condition. (Slot `src` keeps a copy; reset or ignore it.)"""
    for t in (state.cache, state.offset, state.temp, state.top_k, state.temp_text, state.top_k_text,
              state.seeds, state.draws, state.forced, state.rep_penalty, state.rep_context, state.pad_mult, state.text_history,
              state.text_count):
        if t is not None:
            t[dst].copy_(t[src])
    width = 2 if state.guided else 1
    for i in range(width):
        a, b = width * src + i, width * dst + i
        for transformer in (state.temporal, state.depth):
            if transformer is not None:
                transformer.move(a, b)
        if state.condition is not None:
            state.condition[b].copy_(state.condition[a])


@dataclass(frozen=True)
class SlotSnapshot:
    """A slot's conversation state, copied out of a GenState (`save_slot`): its token streams and
    the filled part of its temporal KV cache. Not its sampling settings nor its seeds."""

    rows: dict[str, torch.Tensor]  # GenState field -> the slot's row
    offset: int  # temporal transformer positions filled (0..offset - 1), in cache slots 0..offset - 1
    keys: list[torch.Tensor]  # per layer [Hkv, offset, Dh]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.rows.values(), *self.keys, *self.values))


_SLOT_ROWS = ("cache", "offset", "forced", "draws", "text_history", "text_count")


def save_slot(state: GenState, slot: int) -> SlotSnapshot:
    """A copy of slot `slot`'s conversation (see SlotSnapshot), for `load_slot` into any slot of a
    state made for the same model. Its temporal transformer must not have wrapped its ring yet."""
    if state.guided:
        raise ValueError("slot snapshots do not support classifier-free guidance")
    t = state.temporal
    n = int(t.offset[slot])
    if n > t.capacity:
        raise ValueError(f"slot {slot} is at position {n}, past its KV cache's {t.capacity} slots")
    rows = {name: getattr(state, name)[slot].clone() for name in _SLOT_ROWS if getattr(state, name) is not None}
    return SlotSnapshot(rows, n, [k[slot, :, :n].clone() for k in t.keys], [v[slot, :, :n].clone() for v in t.values])


def load_slot(state: GenState, slot: int, snap: SlotSnapshot) -> None:
    """Slot `slot` continues the conversation of `snap` (its sampling settings and seeds stay)."""
    for name, row in snap.rows.items():
        getattr(state, name)[slot].copy_(row)
    t, n = state.temporal, snap.offset
    t.offset[slot] = n
    t.key_pos[slot].fill_(-1)
    t.key_pos[slot, :n] = torch.arange(n, device=t.key_pos.device)
    for k, v, sk, sv in zip(t.keys, t.values, snap.keys, snap.values):
        k[slot, :, :n].copy_(sk)
        v[slot, :, :n].copy_(sv)


def read_window(calls: int, state: GenState) -> int:
    """Cache slots the temporal transformer must read at the (calls + 1)-th step since init."""
    return Transformer.read_window(calls, state.temporal.capacity)


def reset_slots(state: GenState, mask: torch.Tensor | None = None) -> None:
    """Starts a new conversation in the slots where mask [B] is True (all when None)."""
    if mask is None:
        state.cache.fill_(UNGENERATED_TOKEN)
        state.offset.zero_()
        state.forced.fill_(NOT_FORCED)
        if state.text_history is not None:
            state.text_history.fill_(-1)
            state.text_count.zero_()
    else:
        mask = mask.to(state.offset.device)
        state.cache.masked_fill_(mask[:, None, None], UNGENERATED_TOKEN)
        state.offset.masked_fill_(mask, 0)
        state.forced.masked_fill_(mask[:, None, None], NOT_FORCED)
        if state.text_history is not None:
            state.text_history.masked_fill_(mask[:, None], -1)
            state.text_count.masked_fill_(mask, 0)
        mask = _rows(state, mask)
    state.temporal.reset(mask)


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
    Q, C = cfg.gen_q, state.cache.shape[2]
    if user_codes.dim() != 2:
        raise ValueError(f"user_codes must be [batch, codebooks], got shape {tuple(user_codes.shape)}")
    B, Ku = user_codes.shape
    if B != state.batch_size:
        raise ValueError(f"user_codes has batch {B}, the state was made for {state.batch_size}")
    if Ku < cfg.num_user_codebooks:
        raise ValueError(f"user_codes has {Ku} codebooks, the model reads {cfg.num_user_codebooks}")
    user_codes = user_codes[:, :cfg.num_user_codebooks].to(state.cache.device)
    if check:
        check_codes(user_codes, cfg.card, "user_codes")
    if forced is not None:
        forced = forced.to(state.cache.device)
        if check:
            check_forced(forced, cfg, B)
        # Each forced token waits at its delayed position for the step that produces it.
        at = (state.offset[:, None] + 1 + state.delays[:Q + 1]) % C  # [B, 1 + Q]
        given = forced != NOT_FORCED
        if active is not None:
            given = given & active[:, None]
        state.forced.scatter_(2, at[..., None], torch.where(given, forced, state.forced.gather(2, at[..., None])[..., 0])[..., None])
    target = ((state.offset + 1) % C)[:, None].expand(B, Q + 1)  # the position this step produces
    pending = state.forced.gather(2, target[..., None])[..., 0]  # [B, 1 + Q]

    # The user's codes of this frame go where their delayed streams will read them.
    user_delays = state.delays[Q + 1:]
    _write(state.cache[:, Q + 1:], (state.offset[:, None] + user_delays) % C, user_codes, active)

    # Read this step's tokens; streams that have not started yet read the initial token.
    not_started = state.offset[:, None, None] <= state.delays[None, :, None]  # [B, K, 1]
    if active is not None:
        not_started = not_started | ~active[:, None, None]
    index = (state.offset % C)[:, None, None].expand(B, cfg.num_codebooks, 1)
    tokens = torch.where(not_started, state.initial, state.cache.gather(2, index))  # [B, K, 1]

    tokens = _rows(state, tokens)  # with guidance, both rows of a slot read its tokens
    rows_active = None if active is None else _rows(state, active)
    if embeddings is not None:
        embeddings = (_rows(state, embeddings[0]), _rows(state, embeddings[1]))
    hidden, text_logits = lm.forward_text(tokens, state.temporal, rows_active, state.condition, attend,
                                          embeddings)  # [B', 1, D], [B', 1, N]
    text_logits = _guide(state, text_logits)[:, 0]  # [B, N]
    if state.shaped_text:
        text_logits = shape_text_logits(text_logits, state.text_history, state.text_count, state.rep_penalty,
                                        state.rep_context, state.pad_mult, cfg.existing_text_padding_id)
    if state.greedy_text:
        text = text_logits.argmax(dim=-1)
    else:
        text = _sample(state, 0, text_logits, state.temp_text, state.top_k_text, state.max_k_text, generator)
    text = torch.where(pending[:, 0] != NOT_FORCED, pending[:, 0], text)
    if state.shaped_text:
        push_text_history(state.text_history, state.text_count, text,
                          (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id), active)
    audio = depth_step(lm, state, text, hidden, generator, pending[:, 1:]) if Q else None
    _write(state.forced, target, torch.full_like(pending, NOT_FORCED), active)  # used: free the positions

    if active is None:
        state.offset.add_(1)
    else:
        state.offset.add_(active.long())
    position = (state.offset % C)[:, None]  # [B, 1]
    produced = text[:, None] if audio is None else torch.cat([text[:, None], audio], dim=1)  # [B, 1 + Q]
    _write(state.cache[:, :Q + 1], position.expand(B, Q + 1), produced, active)

    # The frame max_delay steps back is now complete in every generated stream.
    back = (state.offset[:, None] - cfg.max_delay + state.delays[:Q + 1]) % C  # [B, 1 + Q]
    frame = state.cache[:, :Q + 1].gather(2, back[..., None])[..., 0]  # [B, 1 + Q]
    valid = state.offset > cfg.max_delay
    if active is not None:
        valid = valid & active
    return StepOutput(text=frame[:, 0], audio=frame[:, 1:], valid=valid)


def depth_step(lm: LMModel, state: GenState, text: torch.Tensor, hidden: torch.Tensor,
               generator: torch.Generator | None = None, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The depth transformer samples the frame's gen_q audio codebooks in order. text [B] -> [B, Q].
    hidden [B', 1, D]: B' = 2B rows with guidance. forced [B, Q]: tokens that replace the sampled
    ones (NOT_FORCED where none), read as the previous codebook by the next depth step."""
    depth = state.depth
    depth.reset()
    prev, out = text[:, None], []  # [B, 1]
    for q in range(lm.cfg.gen_q):
        x = lm.depformer_input(q, _rows(state, prev), hidden)  # [B', 1, Dd]
        y = lm.depformer(x, depth, step=q)
        logits = _guide(state, lm.depformer_logits(q, y)[:, 0])  # [B, card]
        if state.greedy_audio:
            token = logits.argmax(dim=-1)
        else:
            token = _sample(state, 1, logits, state.temp, state.top_k, state.max_k, generator)
        if forced is not None:
            token = torch.where(forced[:, q] != NOT_FORCED, forced[:, q], token)
        out.append(token)
        prev = token[:, None]
    return torch.stack(out, dim=1)
