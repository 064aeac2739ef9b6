"""CPU fast path for streaming Mimi, applied at the call site: the big matmuls of a streaming
step re-laid out for batch-1 CPU kernels, optionally with bfloat16 or int8 weights. `mimi.py` stays
the float32 reference; this file only swaps modules (like quantize.py) in a copy.

    fast = fast_cpu(mimi)                       # a copy; `mimi` is untouched
    state = fast.init_encode_state(1);  codes = fast.encode_step(pcm, state)

Why it pays: at batch 1 a streaming frame pushes 2 latent steps through ~80 M parameters (two
8-layer transformers, the deep SEANet convs and transposed convs), so the frame time is mostly the
time to read ~320 MB of float32 weights. `F.linear` on 2 rows runs well below memory bandwidth on
this CPU (MKL's GEMM on a transposed [out, in] weight); the default "fp32" mode keeps the very same
weights, stored as contiguous 512-column slices and multiplied as GEMVs, about 2x faster, with the
same math (sums reordered: float32 rounding, codes identical to the reference on speech).

"bf16" (oneDNN AVX512-BF16, bfloat16 activations into the matmul, float32 accumulation) and
"int8" (per-row symmetric, `torch._weight_int8pack_mm`) read 2x / 4x fewer bytes. Measured here,
bf16 is no faster than the sliced fp32 path; int8 saves ~4 ms per frame on the decoder. Both move
the encoder's latents enough to flip codes that are near ties (~10% / ~20% of the codes of the
random test model, whose two nearest centroids are a median 0.3% apart), so use them on the
decoder side only (audio within ~75 dB SNR); see benchmarks/RESULTS.md.

Only matmuls whose weight has at least `min_params` entries are swapped (the deep layers); the
small high-rate SEANet layers are compute-bound and stay as they are. Norms, attention, the KV
cache and the quantizer are untouched. The copy is built for streaming steps; for whole files
(compute-bound, many steps per call) the reference `encode`/`decode` are as fast.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.mimi.conv import StreamingConv1d, StreamingConvTranspose1d, _ConvHolder, _ConvTrHolder
from openmoshi.mimi.codec import Mimi
from openmoshi.modules.transformer import StackedLinear, layer_linears

WEIGHT_MODES = ("fp32", "bf16", "int8")
DEFAULT_MIN_PARAMS = 1 << 18  # 256 K weights (1 MB in float32)
FEW_ROWS = 16  # up to this many input rows a matmul is weight-bound: use the GEMV-friendly layout
SLICE = 512  # fp32 weights are stored as input slices this wide


class FastMatmul(nn.Module):
    """y = x W^T (+ bias) for float32 x [..., in], W [out, in] stored as `mode` says:

    - "fp32": the same weights, cut along the input into slices of SLICE columns, each slice a
      contiguous [out, SLICE] block: y = sum_j W_j x_j, one batched GEMV per slice. MKL streams
      such blocks near memory bandwidth, ~2x `F.linear` for 2 rows and long inputs
      (same math, the sums reordered).
    - "bf16": W in bfloat16, x rounded to bfloat16, float32 accumulation (oneDNN AVX512-BF16).
    - "int8": W ~ q * scale, symmetric per output row, torch's weight-only int8 kernel
      (`torch._weight_int8pack_mm`, bfloat16 activations)."""

    def __init__(self, weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None):
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {mode!r}, expected one of {WEIGHT_MODES}")
        self.mode = mode
        self.out_dim, self.in_dim = weight.shape
        w = weight.detach().float()
        if mode == "fp32":
            n = self.in_dim // SLICE if self.in_dim % SLICE == 0 else 1
            w = w.view(self.out_dim, n, self.in_dim // n).transpose(0, 1)  # [n, out, in / n]
            self.register_buffer("weight", w.contiguous())
        elif mode == "bf16":
            self.register_buffer("weight", w.to(torch.bfloat16).contiguous())
        else:
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127)
                                 .to(torch.int8).contiguous())
            self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_dim)  # [M, in]
        if self.mode == "fp32":
            n, M = self.weight.shape[0], x2.shape[0]
            if M <= FEW_ROWS:
                # [n, in / n, M], each slice column-major: the layout MKL's GEMV path wants
                xs = x2.contiguous().view(M, n, -1).permute(1, 2, 0)
                y = torch.bmm(self.weight, xs).sum(0).t()  # [M, out]
            else:  # many rows (whole signals): compute-bound, the library GEMM on the full weight
                y = F.linear(x2, self.weight.transpose(0, 1).reshape(self.out_dim, self.in_dim))
        elif self.mode == "bf16":
            y = F.linear(x2.to(torch.bfloat16), self.weight).to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.scale)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_dim)


class FastLinear(nn.Module):
    """Stands in for a transformer `StackedLinear` (one weight set) or bias-free `nn.Linear`."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        self.fast = FastMatmul(weight, mode)

    def forward(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.fast(x)


class FastConvHolder(_ConvHolder):
    """`_ConvHolder` whose streaming matmul is a `FastMatmul`."""

    def __init__(self, holder: _ConvHolder, mode: str):
        super().__init__(holder.conv)  # the float32 conv is kept for whole-signal `forward`
        w = holder.conv.weight
        self.fast = FastMatmul(w.view(w.shape[0], -1), mode, holder.conv.bias)

    def matmul(self, win: torch.Tensor) -> torch.Tensor:
        return self.fast(win)


class FastConvTrHolder(_ConvTrHolder):
    """`_ConvTrHolder` whose matmul is a `FastMatmul`."""

    def __init__(self, holder: _ConvTrHolder, mode: str):
        super().__init__(holder.convtr)
        w = holder.convtr.weight  # [C_in, C_out, k]
        self.fast = FastMatmul(w.view(w.shape[0], -1).t(), mode)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)


def _swap_linear(parent: nn.Module, name: str, mode: str, min_params: int) -> None:
    old = getattr(parent, name)
    if isinstance(old, StackedLinear) and old.weight.shape[0] != old.out_dim:
        return  # several weight sets (the LM's depth transformer): not in Mimi
    if isinstance(old, nn.Linear) and old.bias is not None:
        return
    if old.weight.numel() >= min_params:
        setattr(parent, name, FastLinear(old.weight, mode))


def _swap_all(part: nn.Module, mode: str, min_params: int) -> None:
    for module, name in layer_linears(part):
        _swap_linear(module, name, mode, min_params)
    for module in list(part.modules()):
        if isinstance(module, StreamingConv1d):
            conv = module.conv.conv
            if conv.groups == 1 and conv.weight.numel() >= min_params:
                module.conv = FastConvHolder(module.conv, mode)
        elif isinstance(module, StreamingConvTranspose1d):
            convtr = module.convtr.convtr
            if convtr.groups == 1 and convtr.weight.numel() >= min_params:
                module.convtr = FastConvTrHolder(module.convtr, mode)


def fast_cpu(mimi: Mimi, encode: str = "fp32", decode: str = "fp32",
             min_params: int = DEFAULT_MIN_PARAMS) -> Mimi:
    """A copy of `mimi` (eval mode) whose large matmuls are `FastMatmul`s: `encode` is the weight
    mode of the encoder side (SEANet encoder, encoder transformer, downsample), `decode` of the
    decoder side (upsample, decoder transformer, SEANet decoder). The quantizer is untouched.

    Keep `encode="fp32"` where codes must match the reference: codes are an argmin over 2048
    distances that can be near ties. `decode="int8"` is the fastest choice for audio output."""
    for mode in (encode, decode):
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {mode!r}, expected one of {WEIGHT_MODES}")
    fast = copy.deepcopy(mimi).eval()
    for part in (fast.encoder, fast.encoder_transformer, fast.downsample):
        _swap_all(part, encode, min_params)
    for part in (fast.upsample, fast.decoder_transformer, fast.decoder):
        _swap_all(part, decode, min_params)
    return fast
