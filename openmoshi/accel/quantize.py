"""Weight-only int8 and int4 quantization of the LM's transformer linears.

Like gpt-fast, this file swaps modules and leaves the model files untouched: `quantize_lm(lm, "int8")`
replaces every linear layer of the temporal and depth transformers (attention projections and
feed-forwards, ~98% of the 7B's weights) by a `QuantizedLinear`. Embeddings and output heads stay
in the run dtype.

- int8: symmetric, one float scale per output row (per channel): W ~ q * scale, q in [-127, 127].
- int4: asymmetric per group of `group_size` inputs: W ~ (q - 8) * scale + offset, q in [0, 15],
  two values packed per byte.

The reference forward dequantizes and calls `F.linear`; on CUDA, int8 at a few rows uses a small
Triton GEMV (`int8_kernel.py`) that reads each int8 weight once; with bfloat16 activations int4 uses
PyTorch's tinygemm kernels (`torch._weight_int4pack_mm` on CUDA, which reads half the bytes of int8
at batch 1, and its CPU port). On CUDA the kernel's packed copy replaces ours once made, so the
weights are held once.

Quantized models save and load as safetensors with the format in the header metadata
(`openmoshi quantize` writes them; `checkpoint.load_lm` reads them back).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.accel import int8_kernel
from openmoshi.modules.transformer import Index, StackedLinear, layer_linears, per_step

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # int4 group sizes PyTorch's tinygemm kernels support
DEFAULT_GROUP_SIZE = 128
# Header metadata of a quantized checkpoint: the mode and group size, and what it was made from
# (the LM config as JSON, the LoRA adapter merged into it), which loading checks.
FORMAT_KEY = "openmoshi_quantization"
CONFIG_KEY = "openmoshi_lm_config"
LORA_KEY = "openmoshi_lora_merged"


# Both quantizers work on blocks of rows, each block in place on one float32 copy: a 7B layer has up
# to 92M weights, and a float32 temporary of the whole weight would cost 370 MB (`openmoshi quantize`
# and quantize-on-load run layer by layer to keep memory at the final model's size).
ROWS_PER_BLOCK = 1024


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale float32 [out])."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], ROWS_PER_BLOCK):
        block = w[r:r + ROWS_PER_BLOCK].to(torch.float32, copy=True)
        lo, hi = block.aminmax(dim=1)
        s = torch.maximum(-lo, hi).clamp(min=1e-8) / 127  # max |w| per row
        q[r:r + ROWS_PER_BLOCK] = block.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[r:r + ROWS_PER_BLOCK] = s
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in / 2], scale [out, G], offset [out, G]), G = in / group_size."""
    out_dim, in_dim = w.shape
    G = in_dim // group_size
    packed = torch.empty(out_dim, in_dim // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out_dim, G, dtype=torch.float32, device=w.device)
    offset = torch.empty(out_dim, G, dtype=torch.float32, device=w.device)
    for r in range(0, out_dim, ROWS_PER_BLOCK):
        rows = slice(r, r + ROWS_PER_BLOCK)
        g = w[rows].to(torch.float32, copy=True).view(-1, G, group_size)
        lo, hi = g.aminmax(dim=-1)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        q = g.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(-1, in_dim)
        packed[rows] = q[:, 0::2] | (q[:, 1::2] << 4)
        scale[rows], offset[rows] = s, lo + 8 * s  # offset: the value of q = 8, the middle of the range
    return packed, scale, offset


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out_dim = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(out_dim, scale.shape[1], -1)  # [out, G, group]
    w = (q.float() - 8) * scale[..., None] + offset[..., None]
    return w.view(out_dim, -1).to(dtype)


class QuantizedLinear(nn.Module):
    """Bias-free linear with quantized weights; `num_sets` stacked weight sets like StackedLinear."""

    def __init__(self, in_dim: int, out_dim: int, mode: str, num_sets: int = 1,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}, expected one of {MODES}")
        if mode == "int4" and in_dim % group_size:
            raise ValueError(f"int4 needs in_dim={in_dim} to be a multiple of group_size={group_size}")
        self.in_dim, self.out_dim, self.mode, self.group_size, self.dtype = in_dim, out_dim, mode, group_size, dtype
        rows = num_sets * out_dim
        if mode == "int8":
            self.register_buffer("qweight", torch.zeros(rows, in_dim, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(rows))
        else:
            self.register_buffer("qweight", torch.zeros(rows, in_dim // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(rows, in_dim // group_size))
            self.register_buffer("offset", torch.zeros(rows, in_dim // group_size))
        self._tinygemm: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_weight(cls, w: torch.Tensor, mode: str, num_sets: int = 1,
                    group_size: int = DEFAULT_GROUP_SIZE) -> "QuantizedLinear":
        rows, in_dim = w.shape
        m = cls(in_dim, rows // num_sets, mode, num_sets, group_size, w.dtype).to(w.device)
        if w.is_meta:
            return m
        if mode == "int8":
            m.qweight, m.scale = quantize_int8(w)
        else:
            m.qweight, m.scale, m.offset = quantize_int4(w, group_size)
        return m

    @property
    def num_sets(self) -> int:
        return self.scale.shape[0] // self.out_dim

    def weight(self, index: int = 0) -> torch.Tensor:
        """The dequantized weight set `index`, [out, in] in the run dtype."""
        rows = slice(index * self.out_dim, (index + 1) * self.out_dim)
        if self.mode == "int8":
            return (self.qweight[rows].float() * self.scale[rows, None]).to(self.dtype)
        return dequantize_int4(self.qweight[rows], self.scale[rows], self.offset[rows], self.dtype)

    def forward(self, x: torch.Tensor, index: Index = 0) -> torch.Tensor:
        if not isinstance(index, int):  # one weight set per step (a whole depth-transformer sequence)
            return per_step(self.forward, x, index)
        if torch.is_grad_enabled() and x.requires_grad:  # adapters train on top (QLoRA)
            return _DequantizedMatmul.apply(x, self, index)
        if self.mode == "int4" and x.dtype == torch.bfloat16:
            return self._forward_tinygemm(x, index)
        if self.mode == "int8" and x.is_cuda and int8_kernel.available():
            x2 = x.reshape(-1, self.in_dim).contiguous()
            if x2.shape[0] <= int8_kernel.MAX_ROWS:
                rows = slice(index * self.out_dim, (index + 1) * self.out_dim)
                y = int8_kernel.int8_gemv(x2, self.qweight[rows], self.scale[rows])
                return y.view(*x.shape[:-1], self.out_dim)
        return F.linear(x, self.weight(index).to(x.dtype))

    def _forward_tinygemm(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """int4 through PyTorch's tinygemm kernels (CUDA, or their CPU port), bfloat16 activations."""
        if index not in self._tinygemm:  # packed once, on first use, in the kernel's own layout
            self._tinygemm[index] = self._pack_tinygemm(index, x.is_cuda)
            if x.is_cuda and len(self._tinygemm) == self.qweight.shape[0] // self.out_dim:
                # Every set is packed: drop our own copy so the GPU holds the int4 weights once.
                self.qweight = self.qweight.new_empty(0)
        packed_tg, scales_zeros = self._tinygemm[index]
        mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, self.in_dim).contiguous(), packed_tg, self.group_size, scales_zeros)
        return y.view(*x.shape[:-1], self.out_dim)

    def _pack_tinygemm(self, index: int, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qweight.numel() == 0:
            raise RuntimeError("int4 weights were already handed to the CUDA kernel and released")
        rows = slice(index * self.out_dim, (index + 1) * self.out_dim)
        packed = self.qweight[rows]
        q = torch.stack([packed & 15, packed >> 4], dim=-1).view(self.out_dim, -1)  # [out, in] in 0..15
        if cuda:  # the CUDA kernel's input packs the even column in the high nibble (ours: low)
            packed_tg = torch._convert_weight_to_int4pack(((q[:, 0::2] << 4) | q[:, 1::2]).contiguous(), 8)
        else:
            packed_tg = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        # tinygemm computes (q - 8) * scale + zero: the same convention as ours. [G, out, 2]
        scales_zeros = torch.stack([self.scale[rows], self.offset[rows]], dim=-1).transpose(0, 1)
        return packed_tg, scales_zeros.to(torch.bfloat16).contiguous()


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantized on the fly, for a gradient with respect to x. The backward
    dequantizes W again instead of keeping it: kept, every layer's float weight would add up to
    the float model's size, which QLoRA exists to avoid. (The kernels above have no backward.)"""

    @staticmethod
    def forward(ctx, x, layer, index):
        ctx.layer, ctx.index = layer, index
        return F.linear(x, layer.weight(index).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight(ctx.index).to(grad.dtype), None, None


def quantize_linear(parent: nn.Module, name: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Swaps `parent.<name>` (a linear or stacked linear) for its quantized form, in place."""
    old = getattr(parent, name)
    if not isinstance(old, (StackedLinear, nn.Linear)):
        return  # quantized already
    if mode == "int4" and old.weight.shape[1] % group_size:
        return  # an input width the groups do not divide stays in float (none in the released models)
    if isinstance(old, StackedLinear):
        num_sets = old.weight.shape[0] // old.out_dim
        new = QuantizedLinear.from_weight(old.weight.data, mode, num_sets, group_size)
    elif isinstance(old, nn.Linear):
        if old.bias is not None:
            return
        new = QuantizedLinear.from_weight(old.weight.data, mode, 1, group_size)
    else:
        return
    setattr(parent, name, new)


def quantize_transformer_layers(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Swaps the linears of every transformer layer in `model` for quantized ones, in place."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}, expected one of {MODES}")
    for module, name in layer_linears(model):
        quantize_linear(module, name, mode, group_size)


def quantize_lm(lm: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    quantize_transformer_layers(lm.transformer, mode, group_size)
    if lm.depformer is not None:
        quantize_transformer_layers(lm.depformer, mode, group_size)
    lm.quantization = (mode, group_size)
    return lm


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Quantized linears dequantize to `dtype` (the dtype of the rest of the model); their scales
    stay in float32."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.dtype = dtype
            m.scale = m.scale.float()
            if m.mode == "int4":
                m.offset = m.offset.float()


def unquantizable_widths(lm: nn.Module, group_size: int) -> dict[str, int]:
    """{name: input width} of the layer linears whose input width `group_size` does not divide:
    int4 would leave them in float (see `quantize_linear`). Works on a model built on the meta device."""
    names = {id(m): n for n, m in lm.named_modules()}
    out = {}
    for module, attr in layer_linears(lm):
        layer = getattr(module, attr)
        width = layer.in_dim if isinstance(layer, QuantizedLinear) else layer.weight.shape[1]
        if width % group_size:
            out[f"{names[id(module)]}.{attr}"] = width
    return out


def save_quantized_lm(lm: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Writes the quantized `lm` as safetensors, with the format (and `metadata`) in the header.
    The file appears whole or not at all: written beside `path`, then renamed."""
    from safetensors.torch import save_file

    mode, group_size = lm.quantization
    if any(isinstance(m, QuantizedLinear) and m.qweight.numel() == 0 for m in lm.modules()):
        raise RuntimeError("this model already ran int4 on the GPU and released its packed weights: "
                           "save the quantized model before running it on CUDA")
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={**(metadata or {}), FORMAT_KEY: mode, "group_size": str(group_size)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def quantized_metadata(path: str | Path) -> dict[str, str] | None:
    """The header metadata of a quantized openmoshi checkpoint, None for any other file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta if FORMAT_KEY in meta else None


def saved_mode(meta: dict[str, str]) -> tuple[str, int]:
    """(mode, group_size) from a quantized checkpoint's header metadata; ValueError if unknown."""
    mode, group = meta[FORMAT_KEY], meta.get("group_size", str(DEFAULT_GROUP_SIZE))
    if mode not in MODES or not group.isdigit() or int(group) < 1:
        raise ValueError(f"unknown quantization {mode!r} (group size {group!r}) in the header")
    return mode, int(group)


def quantization_of(path: str | Path) -> tuple[str, int] | None:
    """(mode, group_size) when `path` is a quantized openmoshi checkpoint, else None."""
    meta = quantized_metadata(path)
    return None if meta is None else saved_mode(meta)
