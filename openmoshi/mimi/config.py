"""Configuration of the Mimi codec: frozen dataclasses and the translation of the official dict.

The official package describes Mimi with a nested dict (`moshi.models.loaders._mimi_config`, also
found as `mimi_config` in some `config.json` files): keys `seanet`, `quantizer`, `transformer`,
`sample_rate`, `channels`, `frame_rate`. `mimi_config_from_dict` turns it into `MimiConfig` and
rejects any key it does not know, so a changed layout fails loudly instead of loading wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from openmoshi.modules.transformer import TransformerConfig


@dataclass(frozen=True)
class SeanetConfig:
    """SEANet encoder/decoder (causal, ELU, constant padding, true skip, no norm)."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


@dataclass(frozen=True)
class QuantizerConfig:
    """Split residual VQ: `n_q_semantic` semantic codebooks, then `n_q - n_q_semantic` acoustic."""

    dimension: int = 256  # codebook vector size
    n_q: int = 32
    n_q_semantic: int = 1
    bins: int = 2048  # entries per codebook
    input_dimension: int = 512
    output_dimension: int = 512

    def __post_init__(self):
        if not 1 <= self.n_q_semantic < self.n_q:
            raise ValueError(f"need 1 <= n_q_semantic < n_q, got {self.n_q_semantic}, {self.n_q}")


def _default_transformer() -> TransformerConfig:
    return TransformerConfig(d_model=512, num_heads=8, num_layers=8, dim_feedforward=2048,
                             causal=True, context=250, norm="layer_norm", gating="none",
                             positional_embedding="rope", max_period=10000.0, layer_scale=0.01)


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24000
    channels: int = 1
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: TransformerConfig = field(default_factory=_default_transformer)

    def __post_init__(self):
        if self.channels != self.seanet.channels:
            raise ValueError(f"channels={self.channels} but seanet.channels={self.seanet.channels}")
        stride = self.encoder_frame_rate / self.frame_rate
        if stride != int(stride) or stride < 1:
            raise ValueError(f"encoder frame rate {self.encoder_frame_rate} is not an integer "
                             f"multiple of frame_rate {self.frame_rate}")
        if self.transformer.d_model != self.seanet.dimension:
            raise ValueError("the transformer d_model must equal seanet.dimension")
        if self.quantizer.input_dimension != self.seanet.dimension or \
                self.quantizer.output_dimension != self.seanet.dimension:
            raise ValueError("quantizer input/output dimensions must equal seanet.dimension")

    @classmethod
    def default(cls) -> MimiConfig:
        """The released Mimi layout (`tokenizer-e351c8d8-checkpoint125.safetensors`)."""
        return cls()

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length  # 25 Hz

    @property
    def downsample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)  # 2

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)  # 1920 samples


# ----------------------------------------------------------------------------- official dict

# Official keys we accept only with the value our implementation hardcodes.
_SEANET_FIXED = {"causal": True, "activation": "ELU", "norm": "none", "pad_mode": "constant",
                 "true_skip": True, "activation_params": {"alpha": 1.0}, "final_activation": None,
                 "trim_right_ratio": 1.0}
_SEANET_IGNORED = ("disable_norm_outer_blocks", "norm_params", "final_activation_params")
_QUANTIZER_KEYS = {"dimension", "n_q", "bins", "input_dimension", "output_dimension",
                   "n_q_semantic"}
# Training-only options of the official quantizer; they do not change inference.
_QUANTIZER_IGNORED = ("q_dropout", "no_quantization_rate", "decay", "threshold_usage_ratio",
                      "replaced_usage_ratio")
_TRANSFORMER_KEYS = {"d_model", "num_heads", "num_layers", "causal", "layer_scale", "context",
                     "max_period", "gating", "norm", "positional_embedding", "dim_feedforward"}
_TOP_KEYS = {"sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer"}


def _check_keys(d: dict, known: set, where: str) -> None:
    for key in d:
        if key not in known:
            raise ValueError(f"unknown key {key!r} in the mimi config ({where}); "
                             f"known keys: {sorted(known)}")


def _seanet_from_dict(d: dict[str, Any]) -> SeanetConfig:
    plain = {"channels", "dimension", "n_filters", "n_residual_layers", "ratios", "kernel_size",
             "residual_kernel_size", "last_kernel_size", "dilation_base", "compress"}
    _check_keys(d, plain | set(_SEANET_FIXED) | set(_SEANET_IGNORED), "seanet")
    for key, value in _SEANET_FIXED.items():
        if key in d and d[key] != value:
            raise ValueError(f"seanet.{key}={d[key]!r} is not supported (only {value!r})")
    kwargs = {k: v for k, v in d.items() if k in plain}
    if "ratios" in kwargs:
        kwargs["ratios"] = tuple(kwargs["ratios"])
    return SeanetConfig(**kwargs)


def _transformer_from_dict(d: dict[str, Any], dimension: int) -> TransformerConfig:
    layout = {"conv_layout", "input_dimension", "output_dimensions"}
    _check_keys(d, _TRANSFORMER_KEYS | layout, "transformer")
    if d.get("conv_layout", True) is not True:
        raise ValueError("transformer.conv_layout must be True for Mimi")
    d_model = d.get("d_model", dimension)
    if d.get("input_dimension", d_model) != d_model or \
            list(d.get("output_dimensions", [d_model])) != [d_model]:
        raise ValueError("transformer input/output projections are not supported: "
                         "input_dimension and output_dimensions must equal d_model")
    base = _default_transformer()
    kwargs = {k: v for k, v in d.items() if k in _TRANSFORMER_KEYS}
    kwargs.setdefault("d_model", dimension)
    if "max_period" in kwargs:
        kwargs["max_period"] = float(kwargs["max_period"])
    return replace(base, **kwargs)


def mimi_config_from_dict(d: dict[str, Any]) -> MimiConfig:
    """Translate the official Mimi config dict (see `moshi.models.loaders._mimi_config`)."""
    _check_keys(d, _TOP_KEYS, "top level")
    seanet = _seanet_from_dict(d.get("seanet", {}))
    q = d.get("quantizer", {})
    _check_keys(q, _QUANTIZER_KEYS | set(_QUANTIZER_IGNORED), "quantizer")
    quantizer = QuantizerConfig(**{k: v for k, v in q.items() if k in _QUANTIZER_KEYS})
    transformer = _transformer_from_dict(d.get("transformer", {}), seanet.dimension)
    top = {k: d[k] for k in ("sample_rate", "channels", "frame_rate") if k in d}
    return MimiConfig(seanet=seanet, quantizer=quantizer, transformer=transformer, **top)
