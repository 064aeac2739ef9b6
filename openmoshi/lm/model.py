"""The Moshi language model (Défossez et al. 2024, "Moshi", section 3.4: RQ-Transformer).

Dimension glossary:
    B batch, K streams (1 text + n_q audio), T frames, D temporal dim, Dd depth dim,
    Q dep_q (audio codebooks the model predicts), N vocabulary size.

Stream 0 is text, streams 1..dep_q are the model's audio codebooks, the rest are the user's.
The temporal transformer reads the sum of the K stream embeddings of a frame (plus, for conditioned
models, a per-conversation condition vector, see conditioners.py; Kyutai TTS also cross-attends to
its speaker embeddings, see modules/transformer.py); the depth transformer then predicts the
frame's text-conditioned audio codebooks one after the other. With `demux_second_text_stream`
(Kyutai TTS) a text id carries two tokens, `(second + 1) * (text_card + 1) + first`, embedded apart
and summed (the second stream reads the text ahead).
Parameter names match the official checkpoints, so weights load with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.lm.conditioners import Attributes, ConditionError, ConditionProvider
from openmoshi.lm.config import ZERO_TOKEN, LMConfig
from openmoshi.lm.delays import delay_codes, undelay
from openmoshi.modules.transformer import Transformer, TransformerState, make_norm


class ScaledEmbedding(nn.Module):
    """Embedding where the id ZERO_TOKEN (-1) gives a zero vector; optionally low rank
    (a small table followed by a linear map) or demuxing two text streams packed in one id."""

    def __init__(self, num: int, dim: int, low_rank: int | None = None, norm: bool = False,
                 demux: bool = False):
        super().__init__()
        width = low_rank or dim
        self.num = num
        self.weight = nn.Parameter(torch.empty(num, width))
        self.reset_parameters()
        self.norm = nn.LayerNorm(width, eps=1e-5) if norm else None
        self.low_rank = nn.Linear(low_rank, dim, bias=False) if low_rank is not None else None
        self.demux = demux
        if demux:  # ids are second * num + first, with second in [-1, num - 1]
            self.out1 = nn.Linear(width, dim, bias=False)
            self.out2 = nn.Linear(width, dim, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., dim]
        is_zero = (ids == ZERO_TOKEN)[..., None]
        ids = ids.clamp(min=0)
        if self.demux:
            first, second = ids % self.num, ids // self.num - 1
            y = self.out1(F.embedding(first, self.weight))
            y2 = self.out2(F.embedding(second.clamp(min=0), self.weight))
            y = y + torch.where((second < 0)[..., None], 0.0, y2)
            return torch.where(is_zero, 0.0, y)
        y = F.embedding(ids, self.weight)
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where(is_zero, torch.zeros((), dtype=y.dtype, device=y.device), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y


@dataclass
class LMOutput:
    """Training outputs, aligned with the input codes (no shift needed for the loss)."""

    logits: torch.Tensor  # [B, Q, T, card], NaN where invalid
    mask: torch.Tensor  # [B, Q, T] bool
    text_logits: torch.Tensor  # [B, 1, T, text_card_out]
    text_mask: torch.Tensor  # [B, 1, T] bool


class LMModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        D, Dd = cfg.dim, cfg.depformer_dim
        self.emb = nn.ModuleList([ScaledEmbedding(cfg.card + 1, D, norm=cfg.norm_emb) for _ in range(cfg.n_q)])
        self.text_emb = ScaledEmbedding(cfg.text_card + 1, D, norm=cfg.norm_emb, demux=cfg.demux_second_text_stream)
        self.text_linear = nn.Linear(D, cfg.text_out_card, bias=cfg.bias_proj)
        self.transformer = Transformer(cfg.temporal)
        self.out_norm = make_norm(cfg.norm, D)
        num_in = 1
        if cfg.depformer_multi_linear:
            sched = cfg.depformer_weights_per_step_schedule
            num_in = max(sched) + 1 if sched else cfg.dep_q
        self.depformer_in = nn.ModuleList([nn.Linear(D, Dd, bias=False) for _ in range(num_in)])
        if cfg.dep_q > 0:
            low = cfg.depformer_low_rank_embeddings
            # The last codebook is never an input of the depth transformer.
            self.depformer_emb = nn.ModuleList(
                [ScaledEmbedding(cfg.card + 1, Dd, low_rank=low, norm=cfg.norm_emb) for _ in range(cfg.dep_q - 1)])
            self.depformer_text_emb = ScaledEmbedding(cfg.text_card + 1, Dd, low_rank=low, norm=cfg.norm_emb,
                                                      demux=cfg.demux_second_text_stream)
            self.depformer_norms = nn.ModuleList(
                [nn.Identity() if cfg.depformer_norm is None else make_norm(cfg.depformer_norm, Dd)
                 for _ in range(cfg.dep_q)])
            self.depformer = Transformer(cfg.depth)
        else:  # speech-to-text models have no depth transformer
            self.depformer_emb = self.depformer_text_emb = self.depformer_norms = self.depformer = None
        self.extra_heads = nn.ModuleList(
            [nn.Linear(D, cfg.extra_heads_dim, bias=False) for _ in range(cfg.extra_heads_num_heads)])
        self.linears = nn.ModuleList([nn.Linear(Dd, cfg.card, bias=cfg.bias_proj) for _ in range(cfg.dep_q)])
        self.condition_provider = None  # kept in float32 like the official loader (see load_lm)
        if cfg.conditioners or cfg.fuser:
            self.condition_provider = ConditionProvider(cfg.conditioners or (), cfg.fuser, D)

    def condition_sum(self, attributes: Sequence[Attributes]) -> torch.Tensor:
        """Condition values per batch item, e.g. [{"description": "very_good"}, ...] -> the summed
        condition [B, 1, D] (float32) to pass as `condition_sum`. None as a value: no condition."""
        if self.condition_provider is None:
            raise ConditionError("this model has no conditioners (config keys 'conditioners'/'fuser')")
        return self.condition_provider(attributes)

    def condition_cross(self, attributes: Sequence[Attributes]) -> torch.Tensor:
        """Condition values per batch item, e.g. [{"speaker_wavs": TensorValue(...), ...}] -> the
        cross-attention source [B, L, D] (float32), for `Transformer.set_cross` or `cross_src`."""
        if self.condition_provider is None or not self.cfg.cross_attention:
            raise ConditionError("this model has no cross-attention conditioning (config keys 'cross_attention'/'fuser.cross')")
        return self.condition_provider.cross(attributes)

    # ------------------------------------------------------------------ temporal transformer

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, T] -> summed stream embeddings [B, T, D]."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.emb):
            x = x + emb(tokens[:, k + 1])
        return x

    def forward_text(self, tokens: torch.Tensor, state: TransformerState | None = None,
                     active: torch.Tensor | None = None, condition_sum: torch.Tensor | None = None,
                     attend: int | None = None,
                     embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     cross_src: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K, T] -> (hidden [B, T, D] after the output norm, text logits [B, T, N]).
        condition_sum [B, 1, D] (see `condition_sum`) is added to every frame's input; `attend`
        bounds the cache slots read (see Transformer.forward). `embeddings` (x [B, T, D], use [B]
        bool): rows where `use` is True read x instead of their tokens' embeddings (a replayed
        PersonaPlex voice preset). `cross_src` [B, L, D]: the cross-attention source of a call
        without state (a streaming state holds its own, see `Transformer.set_cross`)."""
        x = self.embed(tokens)
        if embeddings is not None:
            given, use = embeddings
            x = torch.where(use[:, None, None], given.to(x.dtype), x)
        if condition_sum is not None:
            x = x + condition_sum.to(x.dtype)  # computed in float32, added in the model's dtype
        if cross_src is not None:
            cross_src = cross_src.to(x.dtype)
        h = self.out_norm(self.transformer(x, state, active, attend=attend, cross_src=cross_src).to(x.dtype))
        return h, self.text_linear(h)

    def extra_probs(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The extra heads' probabilities (Kyutai STT's pause heads, the semantic VAD that Unmute
        reads as `prs`): softmax of each head on the temporal output, as the official
        `LMGen.step_with_extra_heads`, in float32 as moshi-server. hidden [B, T, D] -> [B, T, H, E]
        (E = extra_heads_dim), or [B, D] -> [B, H, E]; None for a model without extra heads."""
        if not len(self.extra_heads):
            return None
        logits = torch.stack([head(hidden) for head in self.extra_heads], dim=-2)  # [..., H, E]
        return torch.softmax(logits.float(), dim=-1)

    # ------------------------------------------------------------------ depth transformer

    def depformer_input(self, q: int, prev_token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Input of depth step q: projected temporal output + embedding of the previous token
        (the text token for q = 0). prev_token [B, ...], hidden [B, ..., D] -> [B, ..., Dd]."""
        cfg = self.cfg
        i = 0
        if cfg.depformer_multi_linear:
            sched = cfg.depformer_weights_per_step_schedule
            i = sched[q] if sched else q
        x = self.depformer_in[i](hidden)
        emb = self.depformer_text_emb if q == 0 else self.depformer_emb[q - 1]
        return x + emb(prev_token)

    def depformer_logits(self, q: int, y: torch.Tensor) -> torch.Tensor:
        return self.linears[q](self.depformer_norms[q](y))

    # ------------------------------------------------------------------ training forward

    def initial_tokens(self, device=None) -> torch.Tensor:
        """The tokens read at the first step, [K]: text initial id, then the audio initial id."""
        cfg = self.cfg
        t = torch.full((cfg.num_codebooks,), cfg.initial_token, dtype=torch.long, device=device)
        t[0] = cfg.text_initial_token
        return t

    def forward(self, codes: torch.Tensor, condition_sum: torch.Tensor | None = None,
                cross_src: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced pass over codes [B, K, T] (text stream first, undelayed), conditioned on
        condition_sum [B, 1, D] when given (and cross-attending to cross_src [B, L, D], Kyutai TTS).

        Returns logits aligned with `codes` and masks of the positions that have a valid
        prediction (not lost to the delays, not ZERO_TOKEN in the target).
        """
        cfg = self.cfg
        B, K, T = codes.shape
        if K != cfg.num_codebooks:
            raise ValueError(f"codes have {K} streams, the model expects {cfg.num_codebooks} (1 text + n_q={cfg.n_q})")
        if self.depformer is None:
            raise ValueError("this model has no depth transformer (dep_q = 0)")
        limits = torch.tensor([cfg.text_card] + [cfg.card] * cfg.n_q, device=codes.device)[None, :, None]
        bad = (codes < ZERO_TOKEN) | (codes >= limits)
        if bool(bad.any()):
            b, k, t = bad.nonzero()[0].tolist()
            raise ValueError(f"codes[{b}, {k}, {t}] = {codes[b, k, t].item()} is out of range "
                             f"[0, {limits[0, k, 0].item()}) (or -1 for no input)")
        initial = self.initial_tokens(codes.device)
        delayed = delay_codes(codes, cfg.delays, initial)  # [B, K, T]
        delayed = torch.cat([initial.view(1, K, 1).expand(B, K, 1), delayed], dim=2)  # [B, K, T + 1]
        # Predicts delayed[:, :, 1:].
        hidden, text_logits = self.forward_text(delayed[:, :, :-1], condition_sum=condition_sum, cross_src=cross_src)
        target = delayed[:, :, 1:]
        Q, Dd = cfg.dep_q, cfg.depformer_dim
        steps = [self.depformer_input(q, target[:, q], hidden) for q in range(Q)]  # Q x [B, T, Dd]
        x = torch.stack(steps, dim=2).reshape(B * T, Q, Dd)
        y = self.depformer(x).view(B, T, Q, Dd)
        logits = torch.stack([self.depformer_logits(q, y[:, :, q]) for q in range(Q)], dim=1)  # [B, Q, T, card]
        logits, mask = undelay(logits, cfg.delays[1:Q + 1])
        mask = mask & (codes[:, 1:Q + 1] != ZERO_TOKEN)
        text_logits, text_mask = undelay(text_logits[:, None], cfg.delays[:1])
        text_mask = text_mask & (codes[:, :1] != ZERO_TOKEN)
        return LMOutput(logits, mask, text_logits, text_mask)
