"""Token sampling with per-slot temperature and top-k, free of host synchronisation.

Each slot of a batch (a conversation) has its own temperature and top-k; a temperature <= 0 means
greedy. Top-k is taken at a fixed width `max_k` (shapes stay constant across steps), then entries
beyond each slot's own k are zeroed. Sampling from the top-k probabilities uses the exponential
race (argmax of p / E with E ~ Exp(1)), which draws one sample without `torch.multinomial`'s sync
and consumes the random stream exactly like the official `moshi` sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


TEXT_HISTORY = 256  # the most recent text tokens a repetition penalty can look back at


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
        for name in ("top_k", "top_k_text"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temp", "temp_text"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        if not 0 <= self.repetition_context <= TEXT_HISTORY:
            raise ValueError(f"repetition_context must be in [0, {TEXT_HISTORY}], got {self.repetition_context}")
        if not abs(self.pad_mult) < float("inf"):
            raise ValueError(f"pad_mult must be finite, got {self.pad_mult}")

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
