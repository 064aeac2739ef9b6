"""Mimi, the streaming neural audio codec of Moshi (Défossez et al. 2024, section 3.3).

Glossary: B batch, N audio samples (24 kHz), T frames at 12.5 Hz (one per FRAME_SIZE samples),
K codebooks in use, D latent dim (512).

    encode:  pcm [B, 1, N]
             -> SEANet encoder           [B, D, 2T]   25 Hz
             -> encoder transformer      [B, D, 2T]   causal, 250-step context
             -> downsample conv (k4 s2)  [B, D, T]    12.5 Hz, learned
             -> split RVQ                codes [B, K, T] int64
    decode:  codes [B, K, T]
             -> RVQ decode               [B, D, T]
             -> upsample (depthwise transposed conv k4 s2)  [B, D, 2T]
             -> decoder transformer      [B, D, 2T]
             -> SEANet decoder           pcm [B, 1, T * 1920]

Everything is causal, so both directions stream frame by frame with caller-owned state:

    enc = mimi.init_encode_state(B);  codes = mimi.encode_step(pcm_frames, enc)
    dec = mimi.init_decode_state(B);  pcm = mimi.decode_step(codes, dec)
    enc.reset(mask)   # restart some conversations of the batch (mask: bool [B]); also prefix, move,
                      # save_slot: see openmoshi.modules.slots

Streaming outputs equal the whole-signal `encode`/`decode` outputs. Whole-signal `encode` pads the
audio on the right with zeros to a whole number of frames, like the official `MimiModel.encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from openmoshi.mimi.conv import Conv1dState, ConvTr1dState, StreamingConv1d, StreamingConvTranspose1d
from openmoshi.mimi.config import MimiConfig
from openmoshi.mimi.quantizer import SplitResidualVectorQuantizer
from openmoshi.mimi.seanet import SeanetDecoder, SeanetEncoder, SeanetState
from openmoshi.modules.slots import SlotState, nested
from openmoshi.modules.transformer import Transformer, TransformerConfig, TransformerState

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per frame: 80 ms
DEFAULT_NUM_CODEBOOKS = 8  # what Moshi uses, and the official `get_mimi` default


class LatentTransformer(nn.Module):
    """The transformer on [B, D, T] latents (the official `ProjectedTransformer` with conv layout
    and no projections; `.transformer` keeps the checkpoint's parameter paths)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.transformer = Transformer(cfg)

    def forward(self, x: torch.Tensor, state: TransformerState | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        y = self.transformer(x.transpose(1, 2), state, active)  # [B, T, D]
        return y.transpose(1, 2)  # [B, D, T]


class Downsample(nn.Module):
    """Learned causal conv, kernel 2 * stride, no bias, left padding replicates the first step."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = StreamingConv1d(dim, dim, 2 * stride, stride=stride, bias=False,
                                    pad_mode="replicate")


class Upsample(nn.Module):
    """Learned causal depthwise transposed conv (groups = D, as in the released model)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim,
                                               bias=False)


@dataclass
class MimiEncodeState(SlotState):
    encoder: SeanetState = nested()
    transformer: TransformerState = nested()
    downsample: Conv1dState = nested()


@dataclass
class MimiDecodeState(SlotState):
    upsample: ConvTr1dState = nested()
    transformer: TransformerState = nested()
    decoder: SeanetState = nested()


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig | None = None,
                 num_codebooks: int = DEFAULT_NUM_CODEBOOKS):
        super().__init__()
        cfg = MimiConfig.default() if cfg is None else cfg
        self.cfg = cfg
        D = cfg.seanet.dimension
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = LatentTransformer(cfg.transformer)
        self.decoder_transformer = LatentTransformer(cfg.transformer)
        self.quantizer = SplitResidualVectorQuantizer(cfg.quantizer)
        self.downsample = Downsample(D, cfg.downsample_stride)
        self.upsample = Upsample(D, cfg.downsample_stride)
        self.set_num_codebooks(min(num_codebooks, cfg.quantizer.n_q))

    # ------------------------------------------------------------------ properties

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.quantizer.num_codebooks

    @property
    def total_codebooks(self) -> int:
        return self.cfg.quantizer.n_q

    @property
    def cardinality(self) -> int:
        return self.cfg.quantizer.bins

    def set_num_codebooks(self, k: int) -> None:
        """Number of codebooks `encode` produces (1..32); `decode` takes any such number."""
        self.quantizer.set_num_codebooks(k)

    # ------------------------------------------------------------------ whole signal

    def _check_audio(self, pcm: torch.Tensor, streaming: bool) -> None:
        if pcm.dim() != 3:
            raise ValueError(f"audio must be [B, channels, samples], got shape {tuple(pcm.shape)}")
        if pcm.shape[1] != self.cfg.channels:
            raise ValueError(f"audio must have {self.cfg.channels} channel(s), got {pcm.shape[1]}")
        if not pcm.dtype.is_floating_point:
            raise ValueError(f"audio must be floating point, got {pcm.dtype}")
        N = pcm.shape[-1]
        if N == 0:
            raise ValueError("audio is empty")
        if streaming and N % self.frame_size:
            raise ValueError(f"streaming audio must be a whole number of {self.frame_size}-sample "
                             f"frames, got {N} samples; buffer the rest until the next call")

    def encode_latent(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, N] -> unquantized latent [B, D, T], T = ceil(N / FRAME_SIZE)."""
        self._check_audio(pcm, streaming=False)
        pad = -pcm.shape[-1] % self.frame_size
        x = nn.functional.pad(pcm, (0, pad))  # [B, 1, T * FRAME_SIZE]
        emb = self.encoder(x)  # [B, D, 2T]
        emb = self.encoder_transformer(emb)
        return self.downsample.conv(emb)  # [B, D, T]

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, N] -> codes [B, K, ceil(N / FRAME_SIZE)] int64."""
        return self.quantizer.encode(self.encode_latent(pcm))

    def decode_latent(self, codes: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """codes [B, K, T] -> quantized latent [B, D, T]."""
        return self.quantizer.decode(codes, check_values=check_values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> pcm [B, 1, T * FRAME_SIZE]."""
        emb = self.decode_latent(codes)  # [B, D, T]
        emb = self.upsample.convtr(emb)  # [B, D, 2T]
        emb = self.decoder_transformer(emb)
        return self.decoder(emb)  # [B, 1, T * FRAME_SIZE]

    # ------------------------------------------------------------------ streaming

    def _param(self) -> torch.Tensor:
        return self.downsample.conv.conv.conv.weight

    def init_encode_state(self, batch_size: int, device=None, dtype=None) -> MimiEncodeState:
        device = self._param().device if device is None else device
        dtype = self._param().dtype if dtype is None else dtype
        stride = self.cfg.downsample_stride
        return MimiEncodeState(
            encoder=self.encoder.init_state(batch_size, device, dtype),
            transformer=self.encoder_transformer.transformer.init_state(
                batch_size, device=device, dtype=dtype, max_chunk=stride),
            downsample=self.downsample.conv.init_state(batch_size, device, dtype))

    @torch.no_grad()  # streaming is inference: state updates must not grow an autograd graph
    def encode_step(self, pcm: torch.Tensor, state: MimiEncodeState, active: torch.Tensor | None = None) -> torch.Tensor:
        """pcm [B, 1, F * FRAME_SIZE] -> codes [B, K, F] for those F frames. `active` [B] bool:
        slots that are False compute (garbage codes) but keep their state: a stream that has no
        frame this step, beside others that have one."""
        self._check_audio(pcm, streaming=True)
        emb = self.encoder.step(pcm, state.encoder, active)  # [B, D, 2F]
        emb = self.encoder_transformer(emb, state.transformer, active)
        emb = self.downsample.conv.step(emb, state.downsample, active)  # [B, D, F]
        return self.quantizer.encode(emb)

    def init_decode_state(self, batch_size: int, device=None, dtype=None) -> MimiDecodeState:
        device = self._param().device if device is None else device
        dtype = self._param().dtype if dtype is None else dtype
        stride = self.cfg.downsample_stride
        return MimiDecodeState(
            upsample=self.upsample.convtr.init_state(batch_size, device, dtype),
            transformer=self.decoder_transformer.transformer.init_state(
                batch_size, device=device, dtype=dtype, max_chunk=stride),
            decoder=self.decoder.init_state(batch_size, device, dtype))

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, state: MimiDecodeState) -> torch.Tensor:
        """codes [B, K, F] -> pcm [B, 1, F * FRAME_SIZE].

        Code values are checked only when they live on the CPU: on an accelerator the check
        would stall the stream on a host sync (whole-signal `decode` always checks)."""
        emb = self.decode_latent(codes, check_values=codes.device.type == "cpu")  # [B, D, F]
        emb = self.upsample.convtr.step(emb, state.upsample)  # [B, D, 2F]
        emb = self.decoder_transformer(emb, state.transformer)
        return self.decoder.step(emb, state.decoder)  # [B, 1, F * FRAME_SIZE]
