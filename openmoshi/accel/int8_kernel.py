"""A Triton GEMV for weight-only int8 on CUDA: y = (x @ q^T) * scale for a few rows of x.

At batch 1 a transformer step is bound by reading weights; dequantizing int8 to bf16 and calling
`F.linear` reads the weights twice (and `torch._weight_int8pack_mm` is slow on CUDA), so the int8
path needs its own kernel: each program streams a [BLOCK_N, K] block of int8 rows once and
accumulates in float32. Used for up to `MAX_ROWS` rows; more rows are compute-bound and go through
the dequantize-then-matmul reference. Without Triton (CPU builds), `available()` is False.
"""

from __future__ import annotations

import torch

MAX_ROWS = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _int8_gemv(x_ptr, q_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_qn, stride_ym,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0).to(tl.float32)
            acc += tl.sum(q * x[None, :], axis=1)
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
        tl.store(y_ptr + m * stride_ym + offs_n, (acc * s).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), q int8 [N, K] contiguous, scale float32 [N] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_n, block_k = 32, 256
    grid = (triton.cdiv(N, block_n), M)
    _int8_gemv[grid](x, q, scale, y, N, K, x.stride(0), q.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return y
