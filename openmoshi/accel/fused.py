"""Fused Triton kernels for the small per-layer operations of a streaming step, applied at the call site.

At batch 1 a Moshi frame runs 32 temporal layers and 8 x 6 depth layers, each a handful of big
matmuls and about 40 small element-wise kernels (norm: 7, RoPE on q and k: 20, cache writes: 4,
gating: 2, ...). Each small kernel moves a few kilobytes but costs a launch (2-5 us even inside a
CUDA graph), so together they cost about as much as reading the weights. Four kernels replace them
(a 7B frame's LM step: 2811 launches -> 1238, `benchmarks/kernel_count.py`):

    rms_norm            x * alpha / sqrt(mean(x^2) + eps), float32 inside, one program per row
    rotate_and_cache    q, k, v out of the fused projection; RoPE on q and k (interleaved pairs,
                        float32 tables shared by every layer); k and v written into the ring cache
                        at q_pos % capacity; q returned [B, H, T, Dh]; one program per (row, head)
    gate                act(h[..., :F]) * h[..., F:] for silu / gelu, one read of h, one write
    add_rms_norm        the residual sum after attention and the norm before the feed-forward

`apply(model)` switches the modules of a model (the norms, attentions, gated feed-forwards and
layers of `transformer.py`) to subclasses whose forward runs these kernels when the tensors are on
CUDA, Triton is present and no gradient is wanted; anything else (CPU, other norms or activations,
training, attention without a cache) runs the reference code, which stays the definition.
Parameters and state-dict keys do not change.

Tests run the kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 before
Triton is imported) and compare them with the reference modules.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from openmoshi.accel.env import env_disabled
from openmoshi.modules.transformer import Attention, Gating, Layer, LayerScale, RMSNorm, rope_tables

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATIONS = {"silu": 0, "gelu": 1}  # the gated activations the kernel knows
ENV_OFF = "OPENMOSHI_NO_FUSED_KERNELS"  # set: the call sites keep the reference modules


def available() -> bool:
    return triton is not None


def wanted(device, disabled: bool = False) -> bool:
    """Whether a call site on `device` applies the kernels: CUDA with Triton, unless `disabled` (a
    --no-fused flag) or the environment sets OPENMOSHI_NO_FUSED_KERNELS."""
    return torch.device(device).type == "cuda" and available() and not disabled and not env_disabled(ENV_OFF)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels run on x: Triton on CUDA, or its interpreter on CPU (tests), and no
    gradient is wanted (the kernels have no backward; training takes the reference path)."""
    if triton is None or torch.is_grad_enabled():
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:
    @triton.jit
    def _rms_norm(x_ptr, a_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / D + eps
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (x * (a * tl.rsqrt(var))).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_rms_norm(x_ptr, r_ptr, s_ptr, a_ptr, x_out_ptr, y_ptr, D, eps,
                      SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        # Rounded to the stream's dtype after each operation, as the two separate torch ops do
        # (float32 arithmetic inside: also what Triton's interpreter needs for bfloat16).
        dt = x_out_ptr.dtype.element_ty
        r = tl.load(r_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
        if SCALE:
            r = (r * tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        x = (tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32) + r).to(dt)
        tl.store(x_out_ptr + row * D + offs, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / D + eps
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + offs, (xf * (a * tl.rsqrt(var))).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rotate_and_cache(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
                          T, H, HKV, C, stride_row,
                          HALF: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr):
        bt = tl.program_id(0)  # b * T + t
        h = tl.program_id(1)  # q heads first, then kv heads
        b = bt // T
        t = bt % T
        i = tl.arange(0, BLOCK)
        m = i < HALF
        row = qkv_ptr + bt * stride_row
        if h < H:
            src = row + h * 2 * HALF
            dst = q_ptr + ((b * H + h) * T + t) * 2 * HALF
        else:
            hk = h - H
            src = row + (H + hk) * 2 * HALF
            slot = tl.load(pos_ptr + bt) % C
            dst = k_ptr + ((b * HKV + hk) * C + slot) * 2 * HALF
            # the value head goes to the cache as it is
            vsrc = row + (H + HKV + hk) * 2 * HALF
            vdst = v_ptr + ((b * HKV + hk) * C + slot) * 2 * HALF
            tl.store(vdst + 2 * i, tl.load(vsrc + 2 * i, mask=m), mask=m)
            tl.store(vdst + 2 * i + 1, tl.load(vsrc + 2 * i + 1, mask=m), mask=m)
        re = tl.load(src + 2 * i, mask=m, other=0.0).to(tl.float32)
        im = tl.load(src + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
        if ROPE:
            c = tl.load(cos_ptr + bt * HALF + i, mask=m, other=1.0)
            s = tl.load(sin_ptr + bt * HALF + i, mask=m, other=0.0)
            re, im = re * c - im * s, re * s + im * c
        tl.store(dst + 2 * i, re.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + 2 * i + 1, im.to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _gate(h_ptr, y_ptr, F, stride_h, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F
        a = tl.load(h_ptr + row * stride_h + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + row * stride_h + F + offs, mask=m, other=0.0).to(tl.float32)
        if ACT == 0:
            a = a / (1.0 + tl.exp(-a))
        else:
            a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
        tl.store(y_ptr + row * stride_y + offs, (a * g).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> same shape and dtype, computed in float32."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(D)
    _rms_norm[(x2.shape[0],)](x2, alpha.reshape(-1), y, D, x2.stride(0), y.stride(0), eps,
                              BLOCK=block, num_warps=max(1, min(16, block // 256)))
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, alpha: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + scale * r and its RMS norm, in one pass: x, r [..., D] -> both [..., D]."""
    D = x.shape[-1]
    x2, r2 = x.reshape(-1, D).contiguous(), r.reshape(-1, D).contiguous()
    x_out, y = torch.empty_like(x2), torch.empty_like(x2)
    block = triton.next_power_of_2(D)
    _add_rms_norm[(x2.shape[0],)](x2, r2, scale if scale is not None else alpha, alpha.reshape(-1), x_out, y, D, eps,
                                  SCALE=scale is not None, BLOCK=block, num_warps=max(1, min(16, block // 256)))
    return x_out.view(x.shape), y.view(x.shape)


def rotate_and_cache(qkv: torch.Tensor, q_pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [B, T, (H + 2 Hkv) Dh], q_pos [B, T], rope tables [B, 1, T, Dh/2] float32 (None: no
    rotation), caches [B, Hkv, C, Dh] (written in place) -> q [B, H, T, Dh]."""
    B, T, W = qkv.shape
    _, HKV, C, Dh = k_cache.shape
    if qkv.stride(-1) != 1 or qkv.stride(0) != T * qkv.stride(1):
        qkv = qkv.contiguous()
    q = torch.empty(B, num_heads, T, Dh, device=qkv.device, dtype=qkv.dtype)
    cos, sin = (t.contiguous() for t in rope) if rope is not None else (q_pos, q_pos)  # unused without rope
    _rotate_and_cache[(B * T, num_heads + HKV)](
        qkv, cos, sin, q_pos.contiguous(), q, k_cache, v_cache, T, num_heads, HKV, C, qkv.stride(1),
        HALF=Dh // 2, BLOCK=triton.next_power_of_2(Dh // 2), ROPE=rope is not None, num_warps=1)
    return q


def gate(h: torch.Tensor, act: str) -> torch.Tensor:
    """h [..., 2 F] -> act(h[..., :F]) * h[..., F:], [..., F]."""
    F2 = h.shape[-1]
    h2 = h.reshape(-1, F2)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    y = torch.empty(h2.shape[0], F2 // 2, device=h.device, dtype=h.dtype)
    block = 1024
    _gate[(h2.shape[0], triton.cdiv(F2 // 2, block))](h2, y, F2 // 2, h2.stride(0), y.stride(0),
                                                       ACT=ACTIVATIONS[act], BLOCK=block, num_warps=4)
    return y.view(*h.shape[:-1], F2 // 2)


# ----------------------------------------------------------------------------- module switches


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not usable(x):
            return super().forward(x)
        return rms_norm(x, self.alpha, self.eps)


class FusedAttention(Attention):
    def rotate_and_cache(self, qkv, q_pos, cache, rope, n):
        contiguous_cache = cache is not None and all(c.is_contiguous() for c in cache)
        if not (contiguous_cache and usable(qkv)):
            return super().rotate_and_cache(qkv, q_pos, cache, rope, n)
        k_cache, v_cache = cache
        rotate = self.cfg.positional_embedding == "rope"
        if rotate and rope is None:  # not precomputed by the caller
            rope = rope_tables(q_pos, self.cfg.head_dim, self.cfg.max_period)
        q = rotate_and_cache(qkv, q_pos, rope if rotate else None, k_cache, v_cache, self.cfg.num_heads)
        return q, k_cache[:, :, :n], v_cache[:, :, :n]


class FusedGating(Gating):
    def gate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation not in ACTIVATIONS or not usable(h):
            return super().gate(h)
        return gate(h, self.activation)


class FusedLayer(Layer):
    def forward(self, x, q_pos, index, cache, key_pos, mask, rope=None, cross=None):
        norm2 = self.norm2
        if cross is not None or not (isinstance(norm2, RMSNorm) and usable(x)):  # cross-attention: the reference
            return super().forward(x, q_pos, index, cache, key_pos, mask, rope, cross)
        r = self.self_attn(self.norm1(x), q_pos, index, cache, key_pos, mask, rope)
        scale = self.layer_scale_1.scale if isinstance(self.layer_scale_1, LayerScale) else None
        x, h = add_rms_norm(x, r, scale, norm2.alpha, norm2.eps)  # the residual add and norm2 at once
        return x + self.layer_scale_2(self.feed_forward(h, index))


_SWITCHES = ((RMSNorm, FusedRMSNorm), (Attention, FusedAttention), (Gating, FusedGating), (Layer, FusedLayer))


def apply(model: nn.Module) -> nn.Module:
    """Switches the norms, attentions and gated feed-forwards of `model` (in place) to the fused
    subclasses above; returns the model. A no-op without Triton."""
    if triton is None:
        return model
    for m in model.modules():
        for base, fused in _SWITCHES:
            if type(m) is base:
                m.__class__ = fused
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Switches the fused subclasses of `model` back to the reference modules (in place)."""
    for m in model.modules():
        for base, fused in _SWITCHES:
            if type(m) is fused:
                m.__class__ = base
    return model


def is_applied(model: nn.Module) -> bool:
    return any(isinstance(m, (FusedRMSNorm, FusedAttention, FusedGating, FusedLayer)) for m in model.modules())
