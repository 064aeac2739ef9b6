"""SEANet convolutional encoder and decoder of Mimi (Tagliasacchi et al. 2020; as used in
EnCodec, Défossez et al. 2022, section 3.1, and Mimi, Moshi paper section 3.3).

Glossary: B batch, C channels, T time steps, N audio samples, D latent dim (`dimension`, 512).

Encoder (ratios reversed, [4, 5, 6, 8], hop 960: 24 kHz -> 25 Hz):
    conv k7 (1 -> 64)
    for each ratio r:  residual block, ELU, conv k=2r stride r (C -> 2C)
    ELU, conv k3 (1024 -> D)
Decoder (ratios [8, 6, 5, 4]), the mirror image:
    conv k7 (D -> 1024)
    for each ratio r:  ELU, transposed conv k=2r stride r (C -> C/2), residual block
    ELU, conv k3 (64 -> 1)
Residual block (true skip): x + conv k1(ELU(conv k3 dilated(ELU(x)))), hidden C / compress.

Module paths (`model.<i>`, `block.<j>`) match the official state dict, ELUs included, so the
released weights load strictly. Every layer is causal, so the whole network streams: the caller
keeps a `SeanetState` (`init_state`) and calls `step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from openmoshi.mimi.conv import StreamingConv1d, StreamingConvTranspose1d
from openmoshi.mimi.config import SeanetConfig
from openmoshi.modules.slots import SlotState, nested


@dataclass
class SeanetState(SlotState):
    """Streaming state of a sequence of layers: one entry per layer (None for stateless ones)."""

    layers: list[SlotState | None] = nested()


def _init_states(layers: nn.Sequential, batch_size: int, device, dtype) -> SeanetState:
    return SeanetState(layers=[layer.init_state(batch_size, device, dtype)
                               if hasattr(layer, "init_state") else None for layer in layers])


def _step_all(layers: nn.Sequential, x: torch.Tensor, state: SeanetState,
              active: torch.Tensor | None = None) -> torch.Tensor:
    """`active` [B] bool: slots that are False compute but keep their state (encoder layers only)."""
    for layer, s in zip(layers, state.layers):
        if s is None:
            x = layer(x)
        else:
            x = layer.step(x, s) if active is None else layer.step(x, s, active)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(),
            StreamingConv1d(dim, hidden, kernel_size, dilation=dilation),
            nn.ELU(),
            StreamingConv1d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SeanetState:
        return _init_states(self.block, batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: SeanetState, active: torch.Tensor | None = None) -> torch.Tensor:
        return x + _step_all(self.block, x, state, active)


def _residual_blocks(cfg: SeanetConfig, dim: int) -> list[nn.Module]:
    return [ResidualBlock(dim, cfg.residual_kernel_size, cfg.dilation_base ** j, cfg.compress)
            for j in range(cfg.n_residual_layers)]


class SeanetEncoder(nn.Module):
    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, C, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            layers += _residual_blocks(cfg, C)
            layers += [nn.ELU(), StreamingConv1d(C, 2 * C, 2 * ratio, stride=ratio)]
            C *= 2
        layers += [nn.ELU(), StreamingConv1d(C, cfg.dimension, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, channels, N] -> [B, D, N // hop]."""
        return self.model(x)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SeanetState:
        return _init_states(self.model, batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: SeanetState, active: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming: x [B, channels, N] -> [B, D, frames completed by these samples]. `active` [B]
        bool: slots that are False compute but keep their state."""
        return _step_all(self.model, x, state, active)


class SeanetDecoder(nn.Module):
    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, C, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), StreamingConvTranspose1d(C, C // 2, 2 * ratio, stride=ratio)]
            C //= 2
            layers += _residual_blocks(cfg, C)
        layers += [nn.ELU(), StreamingConv1d(C, cfg.channels, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> [B, channels, T * hop]."""
        return self.model(z)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SeanetState:
        return _init_states(self.model, batch_size, device, dtype)

    def step(self, z: torch.Tensor, state: SeanetState) -> torch.Tensor:
        """Streaming: z [B, D, T] -> [B, channels, T * hop]."""
        return _step_all(self.model, z, state)
