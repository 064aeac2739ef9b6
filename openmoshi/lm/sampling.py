"""Token sampling with per-slot temperature and top-k, free of host synchronisation.

Each slot of a batch (a conversation) has its own temperature and top-k; a temperature <= 0 means
greedy. Top-k is taken at a fixed width `max_k` (shapes stay constant across steps), then entries
beyond each slot's own k are zeroed. Sampling from the top-k probabilities uses the exponential
race (argmax of p / E with E ~ Exp(1)), which draws one sample without `torch.multinomial`'s sync
and consumes the random stream exactly like the official `moshi` sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from openmoshi.errors import UserError

TEXT_HISTORY = 256  # the most recent text tokens a repetition penalty can look back at
# What each setting may be: (kind, lowest, highest). Temperatures divide logits (a temperature
# below 1e-6 counts as 1e-6), the penalty divides or multiplies them and pad_mult is added to one:
# these bounds keep every result far inside float32. top-k is capped at the vocabulary afterwards.
LIMITS = {
    "temp": (float, 0.0, 100.0), "top_k": (int, 1, 2 ** 31 - 1),
    "temp_text": (float, 0.0, 100.0), "top_k_text": (int, 1, 2 ** 31 - 1),
    "repetition_penalty": (float, 1e-3, 1e3), "repetition_context": (int, 0, TEXT_HISTORY),
    "pad_mult": (float, -1e6, 1e6),
}
_RULES = {"temp": "must be >= 0 (0: greedy) and at most 100", "top_k": "must be >= 1 and below 2^31",
          "repetition_penalty": "must be > 0 (1 is off), in [0.001, 1000]",
          "repetition_context": f"must be in [0, {TEXT_HISTORY}]", "pad_mult": "must be finite, in [-1e6, 1e6]"}
_RULES.update(temp_text=_RULES["temp"], top_k_text=_RULES["top_k"])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class SamplingConfig:
    """Official LMGen defaults: audio temperature 0.8, top-k 250; text temperature 0.7, top-k 25."""

    temp: float = 0.8
    top_k: int = 250
    temp_text: float = 0.7
    top_k_text: int = 25
    # Text shaping, as the official Rust server offers it (off by default, as in the released
    # sampler): each text token among the slot's last `repetition_context` non-padding ones has its
    # logit divided by `repetition_penalty` (multiplied when negative), and the padding token's
    # logit gets `pad_mult` added (its probability times e^pad_mult, before the temperature).
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    pad_mult: float = 0.0

    @classmethod
    def greedy(cls) -> "SamplingConfig":
        return cls(temp=0.0, temp_text=0.0)

    @classmethod
    def from_gen_config(cls, gen: dict) -> "SamplingConfig":
        """A checkpoint's `lm_gen_config` (the official LMGen's names, which are ours); the
        defaults for what it leaves out."""
        return cls(**{k: gen[k] for k in ("temp", "top_k", "temp_text", "top_k_text") if k in gen})

    def __post_init__(self):
        # Every value is checked against what the sampler holds it in (float32 temperatures and
        # biases, int64 counts) and against the range where its arithmetic stays finite: a value
        # that passes here can never fail when a model thread writes it into a slot's tensors.
        for name, (kind, low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise UserError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {_short(value)}")
            if not (low <= value <= high and (isinstance(value, int) or math.isfinite(value))):
                raise UserError(f"{name} {_RULES[name]}, got {_short(value)}")

    @property
    def shapes_text(self) -> bool:
        """Whether the text logits need shaping (a penalty or a padding bias is set)."""
        return self.repetition_penalty != 1.0 or self.pad_mult != 0.0


def sample(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, max_k: int,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, N], temp [B] float, top_k [B] long (<= max_k) -> tokens [B] long. The race's
    Exp(1) draws come from `generator` (shared by the batch), or are given: `noise` [B, max_k]
    (per-slot streams, `slot_exponentials`)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    k = min(max_k, logits.shape[-1])
    probs = torch.softmax(logits / temp.clamp(min=1e-6)[:, None], dim=-1)
    top, idx = probs.topk(k, dim=-1)  # [B, k]
    top = top.masked_fill(torch.arange(k, device=logits.device) >= top_k[:, None], 0.0)
    if noise is None:
        noise = torch.empty_like(top).exponential_(1, generator=generator)
    race = top / noise[:, :k].to(top.dtype)
    sampled = idx.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temp > 0, sampled, greedy)


# ----------------------------------------------------------------------------- text shaping

def shape_text_logits(logits: torch.Tensor, history: torch.Tensor, count: torch.Tensor, penalty: torch.Tensor,
                      context: torch.Tensor, pad_mult: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Repetition penalty and padding bias, per slot, without a host sync. logits [B, N];
    history [B, H] long: a ring of each slot's text tokens (`push_text_history`), count [B] how
    many were pushed; penalty [B] float (1: off), context [B] long, pad_mult [B] float (0: off).
    -> float logits [B, N]. A token seen several times is penalised once."""
    logits = logits.float()
    H = history.shape[1]
    age = (count[:, None] - 1 - torch.arange(H, device=history.device)) % H  # 0: the newest entry
    recent = age < torch.minimum(context, count)[:, None]
    seen = torch.zeros_like(logits).scatter_add_(1, history.clamp(min=0), recent.to(logits.dtype)) > 0
    p = penalty[:, None].to(logits.dtype)
    logits = torch.where(seen, torch.where(logits >= 0, logits / p, logits * p), logits)
    pad = torch.arange(logits.shape[1], device=logits.device) == pad_id
    return logits + pad * pad_mult[:, None].to(logits.dtype)


def push_text_history(history: torch.Tensor, count: torch.Tensor, tokens: torch.Tensor, skip: tuple[int, ...],
                      active: torch.Tensor | None = None) -> None:
    """Appends tokens [B] to each slot's ring, in place, except the ids in `skip` (padding) and
    slots where `active` is False."""
    keep = torch.ones_like(tokens, dtype=torch.bool) if active is None else active.clone()
    for token in skip:
        keep &= tokens != token
    pos = (count % history.shape[1])[:, None]
    history.scatter_(1, pos, torch.where(keep[:, None], tokens[:, None], history.gather(1, pos)))
    count.add_(keep.long())


# ----------------------------------------------------------------------------- per-slot streams

# SplitMix64 (Steele, Lea and Flood 2014) in int64 arithmetic: products wrap modulo 2^64 as the
# unsigned original, and right shifts are made logical by masking the sign extension.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def slot_exponentials(seed: torch.Tensor, draws: torch.Tensor, k: int) -> torch.Tensor:
    """Exp(1) draws [B, k] from each slot's own stream: draw j of slot b is a hash of (seed[b],
    draws[b] + j), so a slot's draws depend on its seed and how many it has taken, not on which
    other slots share the batch or where its row is. The caller advances `draws` by k."""
    z = seed[:, None] + (draws[:, None] + torch.arange(1, k + 1, device=seed.device)) * _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    u = (_shift(z, 11).double() + 0.5) * 2.0 ** -53  # uniform in (0, 1)
    return -torch.log(u).float()
