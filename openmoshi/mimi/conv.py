"""Causal 1-D convolutions that can run on a whole signal or stream it chunk by chunk.

Glossary: B batch, C channels, T time steps (samples or latent frames), s stride, k kernel size,
d dilation, k_eff = (k - 1) * d + 1 the span of one window, P = k_eff - s the left context.

Both classes follow Mimi's causal layout (official `StreamingConv1d` / `StreamingConvTranspose1d`
with `causal=True`): a conv sees P samples of left padding and no right padding; a transposed
conv trims its k - s overhanging samples on the right. Streaming state is owned by the caller:

    state = conv.init_state(batch_size)
    y = conv.step(x, state)   # any chunk length; concatenated outputs == conv(whole signal)

Padding arithmetic of the strided conv (k = 4, s = 2, d = 1, so P = 2):

    whole signal    p  p | x0 x1 x2 x3 x4 x5 x6      p = pad (zeros, or x0 when replicating)
    windows         [p  p  x0 x1]                  -> y0
                          [x0 x1 x2 x3]            -> y1
                                [x2 x3 x4 x5]      -> y2      x6 waits: its window is not full
    T_out = T // s; the last T % s samples only count once more samples arrive.

    streaming       state = [last P samples | up to s - 1 samples not yet covering a stride]
                    buffer = state ++ chunk; emit every full window; keep the tail as state.

Transposed conv (k = 4, s = 2): every input step writes k samples starting at t * s, so the last
k - s samples of each chunk overlap the next chunk's first output. Streaming keeps them (bias
removed, it is added again by the next chunk) in `partial` and adds them in:

    chunk n     y[n*s*T ...]   a a a a b b            <- 'b b' = k - s overhang, kept in partial
    chunk n+1                  c c c c d d  + partial on its first k - s samples
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openmoshi.modules.slots import SlotState, host, per_slot

PAD_MODES = ("constant", "replicate")
LIBRARY_CONV_MIN_WINDOWS = 64  # streaming convs with this many output steps use the library conv


class _ConvHolder(nn.Module):
    """Holds the torch conv one level down so parameter names match the released checkpoint
    (`...conv.conv.weight`). `matmul` is the conv on im2col windows, the streaming hot spot:
    accel/mimi_cpu.py swaps the holder for one that keeps the weight in a faster layout or precision."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def matmul(self, win: torch.Tensor) -> torch.Tensor:
        """win [B, n, C_in * k] (each window C_in-major, like the weight) -> [B, n, C_out], bias included."""
        weight = self.conv.weight
        return F.linear(win, weight.view(weight.shape[0], -1), self.conv.bias)


class _ConvTrHolder(nn.Module):
    """Same as `_ConvHolder` for `...convtr.convtr.weight`."""

    def __init__(self, convtr: nn.ConvTranspose1d):
        super().__init__()
        self.convtr = convtr

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C_in] -> every input step's k output samples [B, T, C_out * k], bias excluded."""
        weight = self.convtr.weight  # [C_in, C_out, k]
        return F.linear(x, weight.view(weight.shape[0], -1).t())


@dataclass
class Conv1dState(SlotState):
    """Left context of a streaming conv. `buffer[:, :, :length]` holds the last P samples seen
    (initially the padding) followed by the samples that do not yet complete a stride.
    `length` is a host-side int: it only depends on chunk lengths, which are the same for every
    slot, so reading it never syncs with the device. A reset is exact whenever no partial stride
    is pending (always true for Mimi's whole frames)."""

    buffer: torch.Tensor = per_slot(reset=0.0)  # [B, C_in, P + s - 1], preallocated
    length: int = host()
    first: torch.Tensor = per_slot(reset=True)  # [B] bool, True until the slot has seen a sample (replicate padding)


class StreamingConv1d(nn.Module):
    """Causal Conv1d: P = k_eff - s samples of left padding (zeros or the first sample)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True,
                 pad_mode: str = "constant"):
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.conv = _ConvHolder(nn.Conv1d(in_channels, out_channels, kernel_size, stride,
                                          dilation=dilation, groups=groups, bias=bias))
        self.pad_mode = pad_mode
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.kernel_span = (kernel_size - 1) * dilation + 1  # k_eff
        self.padding = self.kernel_span - stride  # P
        if self.padding < 0:
            raise ValueError(f"stride {stride} larger than the kernel span {self.kernel_span}")

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_channels, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole signal: x [B, C_in, T] -> [B, C_out, T // s]."""
        if x.shape[-1] < self.stride:
            return self._empty(x)
        if self.padding:
            mode = "constant" if self.pad_mode == "constant" else "replicate"
            x = F.pad(x, (self.padding, 0), mode=mode)  # [B, C_in, P + T]
        return self.conv.conv(x)

    def _windows_matmul(self, buf: torch.Tensor, n_out: int) -> torch.Tensor:
        """The conv of the first n_out windows of buf [B, C_in, L] -> [B, C_out, n_out].

        For few windows, one matmul over gathered windows (im2col): on short streaming chunks this
        avoids the per-call weight re-layout of the library conv, several times faster on CPU.
        For many windows (the high-rate SEANet layers) the library conv is faster than gathering.
        The sums are reordered, so it matches `forward` to float rounding, not bit for bit."""
        conv = self.conv.conv
        if conv.groups != 1 or n_out >= LIBRARY_CONV_MIN_WINDOWS:
            return conv(buf[..., : (n_out - 1) * self.stride + self.kernel_span])
        win = buf.unfold(-1, self.kernel_span, self.stride)  # [B, C_in, n_out, k_eff]
        if conv.dilation[0] > 1:
            win = win[..., :: conv.dilation[0]]  # [B, C_in, n_out, k]
        win = win.transpose(1, 2).reshape(buf.shape[0], n_out, -1)  # [B, n_out, C_in * k]
        return self.conv.matmul(win).transpose(1, 2)  # [B, C_out, n_out]

    def init_state(self, batch_size: int, device=None, dtype=None) -> Conv1dState:
        weight = self.conv.conv.weight
        buffer = torch.zeros(batch_size, self.in_channels, self.padding + self.stride - 1,
                             device=device or weight.device, dtype=dtype or weight.dtype)
        first = torch.ones(batch_size, dtype=torch.bool, device=buffer.device)
        return Conv1dState(buffer=buffer, length=self.padding, first=first)

    def step(self, x: torch.Tensor, state: Conv1dState, active: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming: x [B, C_in, T] (any T) -> [B, C_out, number of windows completed]. `active`
        [B] bool: slots that are False compute but keep their state (whole strides only, so that
        every slot's buffer keeps the same length)."""
        T = x.shape[-1]
        if T == 0:
            return self._empty(x)
        P, s, n = self.padding, self.stride, state.length
        if P and self.pad_mode == "replicate":
            # A slot's first chunk replaces its left context by copies of its first sample.
            head = state.buffer[..., :P]
            first = state.first if active is None else state.first & active
            head.copy_(torch.where(first.view(-1, 1, 1), x[..., :1], head))
            if active is None:
                state.first.zero_()
            else:
                state.first.logical_and_(~active)
        buf = torch.cat([state.buffer[..., :n], x], dim=-1) if n else x  # [B, C_in, n + T]
        total = n + T
        n_out = (total - P) // s
        y = self._windows_matmul(buf, n_out) if n_out > 0 else self._empty(x)
        keep = total - n_out * s  # P + samples not covering a stride yet
        if keep:
            new = buf[..., total - keep:]
            if active is not None:
                if keep != n:
                    raise ValueError("idle slots need whole strides: their buffers must keep their length")
                new = torch.where(active.view(-1, 1, 1), new, state.buffer[..., :keep])
            state.buffer[..., :keep].copy_(new)
        state.length = keep
        return y


@dataclass
class ConvTr1dState(SlotState):
    """Overhang of the last chunk's transposed conv, bias removed."""

    partial: torch.Tensor = per_slot(reset=0.0)  # [B, C_out, k - s], preallocated


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d: output T * s samples, the k - s right overhang is trimmed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        self.convtr = _ConvTrHolder(nn.ConvTranspose1d(in_channels, out_channels, kernel_size,
                                                       stride, groups=groups, bias=bias))
        self.out_channels = out_channels
        self.stride = stride
        self.overhang = kernel_size - stride
        if self.overhang < 0:
            raise ValueError(f"stride {stride} larger than kernel size {kernel_size}")

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """Untrimmed transposed conv: x [B, C_in, T] -> [B, C_out, T * s + k - s], bias included.

        When k is a multiple of s (all of Mimi) this is one matmul giving every input step's k
        output samples, then an overlap-add of the k / s stride-long pieces: much faster on CPU
        than the library's transposed conv; equal to it up to float rounding."""
        convtr = self.convtr.convtr
        k, s = convtr.kernel_size[0], self.stride
        if convtr.groups != 1 or k % s:
            return convtr(x)
        B, C_in, T = x.shape
        m = k // s
        cols = self.convtr.matmul(x.transpose(1, 2)).view(B, T, self.out_channels, m, s)
        y = x.new_zeros(B, self.out_channels, T + m - 1, s)
        for j in range(m):  # piece j of step t lands at stride t + j
            y[:, :, j:j + T] += cols[:, :, :, j].transpose(1, 2)  # [B, C_out, T, s]
        y = y.view(B, self.out_channels, -1)  # [B, C_out, (T + m - 1) * s]
        if convtr.bias is not None:
            y += convtr.bias[:, None]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole signal: x [B, C_in, T] -> [B, C_out, T * s]."""
        y = self._full(x)  # [B, C_out, T * s + k - s]
        return y[..., : x.shape[-1] * self.stride]

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvTr1dState:
        weight = self.convtr.convtr.weight
        partial = torch.zeros(batch_size, self.out_channels, self.overhang,
                              device=device or weight.device, dtype=dtype or weight.dtype)
        return ConvTr1dState(partial=partial)

    def step(self, x: torch.Tensor, state: ConvTr1dState) -> torch.Tensor:
        """Streaming: x [B, C_in, T] (any T) -> [B, C_out, T * s]."""
        T = x.shape[-1]
        if T == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0)
        y = self._full(x)  # [B, C_out, T * s + k - s]
        Q = self.overhang
        if Q:
            y[..., :Q] += state.partial
            state.partial.copy_(y[..., T * self.stride:])
            bias = self.convtr.convtr.bias
            if bias is not None:
                state.partial.sub_(bias[:, None])
        return y[..., : T * self.stride]
