"""The causal transformer shared by Mimi and the Moshi LM (temporal and depth transformers).

Dimension glossary:
    B batch, T time steps in this call, D model dim, H heads, Hkv key/value heads, Dh head dim,
    S slots of the ring KV cache, F feed-forward hidden dim, M weight sets (weights per step),
    L length of a cross-attention source.

Streaming state is a `TransformerState` that the caller owns (`init_state`), updated in place:
the KV cache is a ring buffer of fixed size and every slot of the batch has its own position, so
one slot can be reset (`state.reset(mask)`) or left idle (`active`) without touching the others,
and every step has the same shapes (ready for CUDA graphs).

Parameter names follow the released checkpoints (`self_attn.out_proj.weight`,
`gating.linear_in.weight`, `norm1.alpha`, ...), except the released `self_attn.in_proj_weight`,
which is `self_attn.in_proj.weight` here so that every projection is a module (and can be swapped
for a quantized one); checkpoint.canonical_keys renames it.

Cross-attention (`cross_attention=True`, Kyutai TTS): after its self-attention each layer attends
to a fixed source [B, L, D] (the speaker embeddings), without positions or mask, through a
LayerNorm (`norm_cross`) and its own projections (`cross_attention.in_proj.weight`, q | k | v
stacked as the official module). The source's keys and values do not change during a
conversation: `set_cross` computes them once into the state (`cross_keys` / `cross_values`, a
setting of each slot, kept across resets). Without cross-attention the layers have no such
module and the step is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.modules.slots import UNREAD, SlotState, host, per_slot

NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
GATINGS = ("none", "silu", "gelu", "relu", "sigmoid", "tanh", "elu", "leaky_relu", "mish",
           "softsign", "identity")
POSITIONAL_EMBEDDINGS = ("rope", "sin", "none")


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    causal: bool = True
    context: int | None = None  # how many past steps (the current one included) a step sees
    norm: str = "layer_norm"
    gating: str = "none"  # "none": linear1 -> gelu -> linear2, else a gated FFN with this activation
    positional_embedding: str = "rope"
    max_period: float = 10_000.0
    layer_scale: float | None = None
    kv_repeat: int = 1
    weights_per_step: int = 0  # > 0: the i-th step of a sequence uses its own weights (depth transformer)
    weights_per_step_schedule: tuple[int, ...] | None = None  # step -> weight set, for sharing
    cross_attention: bool = False  # each layer also attends to a fixed source (Kyutai TTS)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.kv_repeat:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of kv_repeat={self.kv_repeat}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}, expected one of {NORMS}")
        if self.gating not in GATINGS:
            raise ValueError(f"unknown gating {self.gating!r}, expected one of {GATINGS}")
        if self.positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(f"unknown positional_embedding {self.positional_embedding!r}, "
                             f"expected one of {POSITIONAL_EMBEDDINGS}")
        if self.head_dim % 2 and self.positional_embedding == "rope":
            raise ValueError("rope needs an even head dimension")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be >= 1 or None, got {self.context}")
        sched = self.weights_per_step_schedule
        if sched is not None and len(sched) != self.weights_per_step:
            raise ValueError(f"weights_per_step_schedule has {len(sched)} entries, "
                             f"expected weights_per_step={self.weights_per_step}")
        if self.weights_per_step and self.gating == "none":
            raise ValueError("weights_per_step needs a gated feed-forward (gating != 'none')")
        if self.cross_attention and (self.kv_repeat != 1 or self.weights_per_step):
            raise ValueError("cross_attention needs kv_repeat = 1 and no weights per step (as the official code)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_weight_sets(self) -> int:
        if not self.weights_per_step:
            return 1
        if self.weights_per_step_schedule is not None:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    def weight_index(self, step: int) -> int:
        """Weight set used at position `step` of a sequence (0 without weights per step)."""
        if not self.weights_per_step:
            return 0
        if self.weights_per_step_schedule is not None:
            return self.weights_per_step_schedule[step]
        return step


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, f32: bool):
        super().__init__()
        self.eps, self.f32 = eps, f32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if self.f32 else x
        var = self.eps + torch.mean(xf * xf, dim=-1, keepdim=True)
        return (xf * (self.alpha.to(var.dtype) * torch.rsqrt(var))).to(x.dtype)


class LayerNormF32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """The official norms and their epsilons: the `_f32` ones compute in float32 whatever the dtype."""
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8)
    if kind == "rms_norm":
        return RMSNorm(dim, eps=1e-5, f32=False)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, eps=1e-8, f32=True)
    raise ValueError(f"unknown norm {kind!r}")


class LayerScale(nn.Module):
    """Per-channel residual scale (Touvron et al. 2021, "Going deeper with image transformers")."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.scale = nn.Parameter(torch.full((dim,), init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


# ----------------------------------------------------------------------------- positions


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, Dh/2] of the rotary angles of positions [B, T], float32. Computed once
    per call of the transformer and shared by every layer, for queries and keys."""
    freqs = torch.exp(torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))  # [Dh/2]
    angles = positions.float()[:, None, :, None] * freqs  # [B, 1, T, Dh/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_period: float,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021) on interleaved pairs (x0, x1), (x2, x3), ...

    x: [B, H, T, Dh], positions: [B, T] (or their precomputed `rope_tables`). Computed in float32
    like the official code.
    """
    B, H, T, Dh = x.shape
    cos, sin = rope_tables(positions, Dh, max_period) if tables is None else tables
    pairs = x.view(B, H, T, Dh // 2, 2)
    re, im = pairs[..., 0].float(), pairs[..., 1].float()
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.to(x.dtype).view(B, H, T, Dh)


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of positions [B, T] -> [B, T, dim]."""
    half = dim // 2
    pos = positions.to(dtype)[..., None]
    scale = torch.arange(half, device=positions.device, dtype=dtype) / (half - 1)
    phase = pos / (torch.full([], max_period, device=positions.device, dtype=dtype) ** scale)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask -> additive 0 / -inf bias, once per call rather than inside the
    attention of every layer (where scaled_dot_product_attention would convert it each time)."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


# ----------------------------------------------------------------------------- streaming state


@dataclass
class TransformerState(SlotState):
    """Ring KV cache with per-slot positions. All tensors are updated in place."""

    offset: torch.Tensor = per_slot(reset=0)  # [B] long, steps already processed by each slot
    key_pos: torch.Tensor = per_slot(reset=-1)  # [B, S] long, position held by each cache slot, -1 when empty
    keys: list[torch.Tensor] = per_slot(reset=UNREAD)  # per layer [B, Hkv, S, Dh], read where key_pos >= 0
    values: list[torch.Tensor] = per_slot(reset=UNREAD)  # per layer [B, Hkv, S, Dh]
    max_chunk: int = host()  # most steps one call may add without breaking the context window
    # Cross-attention (a setting of each slot, see the module doc): per layer [B, H, L, Dh], None without.
    cross_keys: list[torch.Tensor] | None = per_slot()
    cross_values: list[torch.Tensor] | None = per_slot()

    @property
    def capacity(self) -> int:
        return self.key_pos.shape[1]

    def _saved(self, name: str, rows, which: slice):
        """Of the keys and values, a snapshot keeps the ring slots filled so far (positions
        0..offset - 1 sit in slots 0..offset - 1 until the ring wraps): a 7B's full-context cache
        is 1.5 GB per slot, a persona prompt's part of it a few hundred MB."""
        if name not in ("keys", "values"):
            return rows
        n = min(int(self.offset[which].max()), self.capacity)
        return [t[:, :, :n] for t in rows]


# ----------------------------------------------------------------------------- layers


Index = int | tuple[int, ...]  # one weight set for every step of x, or one per step (x[:, t])


def per_step(fn, x: torch.Tensor, index: Index) -> torch.Tensor:
    """fn(x, i) with weight set `index`; a tuple gives step t of x [B, T, ...] the set index[t]."""
    if isinstance(index, int):
        return fn(x, index)
    # x[:, t] is a 2-D strided view that matrix products read in place (x[:, t:t + 1] would be copied).
    return torch.stack([fn(x[:, t], i) for t, i in enumerate(index)], dim=1)


class StackedLinear(nn.Module):
    """M bias-free linear layers stored as one [M * out, in] weight, as in the checkpoints."""

    def __init__(self, in_dim: int, out_dim: int, num_sets: int = 1):
        super().__init__()
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(num_sets * out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    @property
    def num_sets(self) -> int:
        return self.weight.shape[0] // self.out_dim

    @property
    def in_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor, index: Index = 0) -> torch.Tensor:
        if isinstance(index, int):
            return F.linear(x, self.weight[index * self.out_dim:(index + 1) * self.out_dim])
        # One view per set: the backward joins their gradients in one concatenation, where a slice
        # per step would write each step's gradient into a zero-filled copy of the whole weight.
        sets = self.weight.split(self.out_dim)
        return per_step(lambda x, i: F.linear(x, sets[i]), x, index)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D, M = cfg.d_model, cfg.num_weight_sets
        self.kv_heads = cfg.num_heads // cfg.kv_repeat
        self.qkv_dim = D + 2 * self.kv_heads * cfg.head_dim
        self.in_proj = StackedLinear(D, self.qkv_dim, M)
        self.out_proj = StackedLinear(D, D, M)

    def forward(self, x: torch.Tensor, q_pos: torch.Tensor, index: Index,
                cache: tuple[torch.Tensor, torch.Tensor] | None, key_pos: torch.Tensor,
                mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        qkv = self.in_proj(x, index)  # [B, T, D + 2 Hkv Dh]
        q, k, v = self.rotate_and_cache(qkv, q_pos, cache, rope, mask.shape[-1] if cache is not None else T)
        if cfg.kv_repeat > 1:
            k = k.repeat_interleave(cfg.kv_repeat, dim=1)
            v = v.repeat_interleave(cfg.kv_repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(y, index)


    def rotate_and_cache(self, qkv: torch.Tensor, q_pos: torch.Tensor,
                         cache: tuple[torch.Tensor, torch.Tensor] | None,
                         rope: tuple[torch.Tensor, torch.Tensor] | None, n: int):
        """qkv [B, T, D + 2 Hkv Dh] -> q [B, H, T, Dh] and the keys/values to attend to: with a
        cache, the rotated keys and the values go into the ring at q_pos % capacity and the first
        `n` cache slots are returned [B, Hkv, n, Dh]; without, this call's own [B, Hkv, T, Dh].
        (`fused.py` replaces this with one kernel on CUDA.)"""
        cfg = self.cfg
        B, T, _ = qkv.shape
        D = cfg.d_model
        q = qkv[..., :D].view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        kv = qkv[..., D:].view(B, T, 2, self.kv_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # [B, Hkv, T, Dh]
        if cfg.positional_embedding == "rope":
            q = apply_rope(q, q_pos, cfg.max_period, rope)
            k = apply_rope(k, q_pos, cfg.max_period, rope)
        if cache is None:
            return q, k, v
        k_cache, v_cache = cache
        idx = (q_pos % k_cache.shape[2])[:, None, :, None].expand(B, self.kv_heads, T, cfg.head_dim)
        k_cache.scatter_(2, idx, k)
        v_cache.scatter_(2, idx, v)
        return q, k_cache[:, :, :n], v_cache[:, :, :n]  # [B, Hkv, S', Dh]


class CrossAttention(nn.Module):
    """Attention of the frames over a fixed source (no positions, no mask). One stacked in_proj
    [3 D, D] (queries, then keys and values of the source) like the official module."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.in_proj = StackedLinear(D, 3 * D)
        self.out_proj = StackedLinear(D, D)

    def keys_values(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, L, D] -> keys, values [B, H, L, Dh]."""
        cfg = self.cfg
        B, L, D = src.shape
        kv = F.linear(src, self.in_proj.weight[D:])  # [B, L, 2 D]
        kv = kv.view(B, L, 2, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        q = F.linear(x, self.in_proj.weight[:D]).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, keys, values)  # [B, H, T, Dh]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Gating(nn.Module):
    """Gated feed-forward: act(x W_a) * (x W_b), then W_out (Shazeer 2020, GLU variants)."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str):
        super().__init__()
        # The official sizing rule: 8 d^2 parameters approximated as 21/8 d for the usual 4 d.
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.gate(self.linear_in(x)))

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """[..., 2 F] -> act(h[..., :F]) * h[..., F:] (one kernel in `fused.py`)."""
        h = h.view(*h.shape[:-1], 2, -1)  # [..., 2, F]
        return activation(self.activation, h[..., 0, :]) * h[..., 1, :]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return x
    if name in ("sigmoid", "tanh", "relu"):
        return getattr(torch, name)(x)
    return getattr(F, name)(x)


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.norm1 = make_norm(cfg.norm, D)
        self.self_attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, D)
        if cfg.gating == "none":
            self.linear1 = nn.Linear(D, cfg.dim_feedforward, bias=False)
            self.linear2 = nn.Linear(cfg.dim_feedforward, D, bias=False)
        elif cfg.weights_per_step:
            self.gating = nn.ModuleList(
                [Gating(D, cfg.dim_feedforward, cfg.gating) for _ in range(cfg.num_weight_sets)])
        else:
            self.gating = Gating(D, cfg.dim_feedforward, cfg.gating)
        if cfg.layer_scale is not None:
            self.layer_scale_1 = LayerScale(D, cfg.layer_scale)
            self.layer_scale_2 = LayerScale(D, cfg.layer_scale)
        else:
            self.layer_scale_1 = self.layer_scale_2 = nn.Identity()
        if cfg.cross_attention:
            self.cross_attention = CrossAttention(cfg)
            self.norm_cross = nn.LayerNorm(D, eps=1e-5)  # a LayerNorm whatever `norm`, as the official layer
            self.layer_scale_cross = nn.Identity() if cfg.layer_scale is None else LayerScale(D, cfg.layer_scale)

    def feed_forward(self, x: torch.Tensor, index: Index) -> torch.Tensor:
        if self.cfg.gating == "none":
            return self.linear2(F.gelu(self.linear1(x)))
        if self.cfg.weights_per_step:
            return per_step(lambda x, i: self.gating[i](x), x, index)
        return self.gating(x)

    def forward(self, x, q_pos, index, cache, key_pos, mask, rope=None, cross=None):
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), q_pos, index, cache, key_pos, mask, rope))
        if cross is not None:  # (keys, values) of the source [B, H, L, Dh]
            x = x + self.layer_scale_cross(self.cross_attention(self.norm_cross(x), *cross))
        return x + self.layer_scale_2(self.feed_forward(self.norm2(x), index))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])

    def init_state(self, batch_size: int, device=None, dtype=None, capacity: int | None = None,
                   max_chunk: int = 1, cross_len: int = 0) -> TransformerState:
        """A fresh streaming state. Without a context window, `capacity` (the longest sequence) is required.

        With a context window, steps of up to `max_chunk` frames see their whole window; longer
        calls are split into chunks of that size. With cross-attention, `cross_len` is the length L
        of the source (`set_cross` fills it; zeros until then).
        """
        cfg = self.cfg
        if not cfg.causal:
            raise ValueError("streaming needs a causal transformer")
        param = self.layers[0].norm1.weight if hasattr(self.layers[0].norm1, "weight") else self.layers[0].norm1.alpha
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        if capacity is None:
            if cfg.context is None:
                raise ValueError("a transformer without context window needs an explicit capacity")
            capacity = cfg.context + max_chunk - 1
        shape = (batch_size, cfg.num_heads // cfg.kv_repeat, capacity, cfg.head_dim)
        cross_keys = cross_values = None
        if cfg.cross_attention:
            if cross_len < 1:
                raise ValueError("a transformer with cross-attention needs the source length: init_state(..., cross_len=L)")
            cross_shape = (batch_size, cfg.num_heads, cross_len, cfg.head_dim)
            cross_keys = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in self.layers]
            cross_values = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in self.layers]
        return TransformerState(
            cross_keys=cross_keys, cross_values=cross_values,
            offset=torch.zeros(batch_size, dtype=torch.long, device=device),
            key_pos=torch.full((batch_size, capacity), -1, dtype=torch.long, device=device),
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            max_chunk=capacity - cfg.context + 1 if cfg.context is not None else capacity)

    def set_cross(self, state: TransformerState, src: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The cross-attention source src [B, L, D] (or [1, L, D]) of the rows where `rows` [B] bool is
        True (all when None): its keys and values, per layer, into the state."""
        if state.cross_keys is None:
            raise ValueError("this transformer has no cross-attention")
        B, _, L, _ = state.cross_keys[0].shape
        if src.dim() != 3 or src.shape[0] not in (1, B) or src.shape[1:] != (L, self.cfg.d_model):
            raise ValueError(f"cross source must be [{B} or 1, {L}, {self.cfg.d_model}], got {tuple(src.shape)}")
        src = src.to(state.cross_keys[0].dtype).expand(B, -1, -1)
        for layer, k_state, v_state in zip(self.layers, state.cross_keys, state.cross_values):
            k, v = layer.cross_attention.keys_values(src)
            if rows is None:
                k_state.copy_(k)
                v_state.copy_(v)
            else:
                m = rows.to(k.device)[:, None, None, None]
                k_state.copy_(torch.where(m, k, k_state))
                v_state.copy_(torch.where(m, v, v_state))

    def _cross(self, state: TransformerState | None, cross_src: torch.Tensor | None) -> list:
        """Per layer, the (keys, values) cross-attention reads, or None entries without it."""
        if not self.cfg.cross_attention:
            if cross_src is not None:
                raise ValueError("this transformer has no cross-attention; pass no cross source")
            return [None] * len(self.layers)
        if cross_src is not None:
            return [layer.cross_attention.keys_values(cross_src) for layer in self.layers]
        if state is None:
            raise ValueError("a transformer with cross-attention needs its source (cross_src, or set_cross on the state)")
        return list(zip(state.cross_keys, state.cross_values))

    def forward(self, x: torch.Tensor, state: TransformerState | None = None,
                active: torch.Tensor | None = None, step: int | None = None,
                attend: int | None = None, cross_src: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D].

        state: None for a whole sequence starting at position 0, else the streaming state.
        active: bool [B]; slots that are False compute but keep their state (idle conversations).
        step: with weights per step, the index in the sequence of x[:, 0] (default: the state's
            offset of slot 0, or 0). All slots must then be at the same step.
        attend: read only the first `attend` slots of the ring (None: all of it). The caller
            guarantees that no slot has reached position `attend` yet (`read_window` computes it
            from the number of calls since `init_state`): early in a conversation the attention
            then reads what is filled, not the whole window. Fixed per value, so a CUDA graph can
            be captured per value.
        cross_src: [B, L, D], the cross-attention source of a whole-sequence call (streaming calls
            read the state's, see `set_cross`).
        """
        B, T, D = x.shape
        cross = self._cross(state, cross_src)
        if state is None:
            return self._forward_whole(x, step or 0, cross)
        if T > state.max_chunk:  # keep each chunk within the ring buffer's reach
            return torch.cat([self.forward(x[:, i:i + state.max_chunk], state, active, step, cross_src=cross_src)
                              for i in range(0, T, state.max_chunk)], dim=1)
        n = state.capacity if attend is None else min(attend, state.capacity)
        if self.cfg.weights_per_step:
            if T != 1:
                raise ValueError("weights per step: give the steps one at a time")
            if step is None:
                raise ValueError("weights per step: pass the step index")
        index = self.cfg.weight_index(step) if self.cfg.weights_per_step else 0
        q_pos = state.offset[:, None] + torch.arange(T, device=x.device)  # [B, T]
        slot = q_pos % state.capacity
        new_pos = q_pos if active is None else torch.where(active[:, None], q_pos, state.key_pos.gather(1, slot))
        state.key_pos.scatter_(1, slot, new_pos)
        key_pos = state.key_pos[:, :n]  # [B, S'], S' = n
        delta = q_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S']
        mask = (key_pos[:, None, :] >= 0) & (delta >= 0)
        if self.cfg.context is not None:
            mask &= delta < self.cfg.context
        if active is not None:  # idle slots attend to everything: finite garbage, never NaN
            mask |= ~active[:, None, None]
        mask = additive(mask[:, None], x.dtype)  # [B, 1, T, S'], and the attention reads S' cache slots
        x = self._embed_positions(x, q_pos)
        rope = self._rope_tables(q_pos)
        for layer, k, v, c in zip(self.layers, state.keys, state.values, cross):
            x = layer(x, q_pos, index, (k, v), state.key_pos, mask, rope, c)
        if active is None:
            state.offset.add_(T)
        else:
            state.offset.add_(active.long() * T)
        return x

    @staticmethod
    def read_window(calls: int, capacity: int, bucket: int = 64) -> int:
        """`attend` for the (calls + 1)-th one-step call since init_state, rounded up to a multiple
        of `bucket` so that a few CUDA graphs cover a conversation."""
        return min(capacity, (calls // bucket + 1) * bucket)

    def _forward_whole(self, x: torch.Tensor, step: int, cross: list) -> torch.Tensor:
        B, T, D = x.shape
        pos = torch.arange(T, device=x.device)
        q_pos = pos.expand(B, T)
        mask = None
        if self.cfg.causal:
            delta = pos[:, None] - pos[None, :]
            mask = delta >= 0
            if self.cfg.context is not None:
                mask &= delta < self.cfg.context
        # With weights per step, step t of the sequence uses its own weight set (depth transformer).
        index = tuple(self.cfg.weight_index(step + t) for t in range(T)) if self.cfg.weights_per_step else 0
        x = self._embed_positions(x, q_pos)
        rope = self._rope_tables(q_pos)
        for layer, c in zip(self.layers, cross):
            x = layer(x, q_pos, index, None, None, None if mask is None else additive(mask, x.dtype), rope, c)
        return x

    def _rope_tables(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.positional_embedding != "rope":
            return None
        return rope_tables(q_pos, self.cfg.head_dim, self.cfg.max_period)

    def _embed_positions(self, x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        if self.cfg.positional_embedding == "sin":
            x = x + sin_embedding(q_pos, x.shape[-1], self.cfg.max_period, x.dtype)
        return x


def layer_linears(model: nn.Module):
    """(module, attribute) of every linear in the transformer layers of `model`: attention
    projections and feed-forwards. What the speed wrappers (accel.quantize, accel.mimi_cpu) swap."""
    for m in list(model.modules()):  # a list first: callers replace the attributes they get
        if isinstance(m, Attention):
            yield m, "in_proj"
            yield m, "out_proj"
        elif isinstance(m, Gating):
            yield m, "linear_in"
            yield m, "linear_out"
        elif isinstance(m, Layer) and m.cfg.gating == "none":
            yield m, "linear1"
            yield m, "linear2"
