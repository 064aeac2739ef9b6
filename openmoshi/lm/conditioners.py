"""LM conditioning: per-conversation attributes turned into vectors the LM reads: the 2B dev
model's `description` (one of "very_bad" .. "very_good") and Kyutai TTS's `cfg` and `control`,
summed into every frame's input embedding; Kyutai TTS's speaker embeddings (`speaker_wavs`), a
sequence the temporal transformer cross-attends to.

Dimension glossary: B batch, D the LM's model dim, E a conditioner's own width (`dim`), L length
of a tensor condition (a sequence of E-vectors).

The official config names each condition and how to fuse it:

    "conditioners": {"description": {"type": "lut", "lut": {"n_bins": 31, "dim": 16,
                                      "tokenizer": "noop", "possible_values": [...]}},
                     "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}}},
    "fuser": {"sum": ["description"], "cross": ["speaker_wavs"], "cross_attention_pos_emb": true}

A conditioner maps one attribute value per batch item to [B, L, D]: a "lut" conditioner looks the
value up in a table of n_bins + 1 rows (the last row is padding), L = 1; a "tensor" conditioner
takes given vectors, [E] or [L, E] with an optional mask [L] (`TensorValue`); both then project
E -> D (`output_proj`). An absent value (None), and the masked positions of a tensor value, give
the learnt padding vector instead, the "null" condition the model was trained with when a
condition was dropped. The "sum" fuser adds the conditions of its attributes (each of length 1);
the result is added to the input embedding at every step (`ConditionProvider.forward`). The
"cross" fuser concatenates its conditions along L, plus a sinusoidal position embedding when
`cross_attention_pos_emb` (`ConditionProvider.cross`). Module and parameter names match the
official checkpoints (`condition_provider.conditioners.<name>.embed.weight`, `.output_proj.weight`,
`.learnt_padding`). The official loader keeps these weights in float32 whatever the model dtype;
so do we.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from openmoshi.errors import UserError
from openmoshi.modules.transformer import sin_embedding

CONDITIONER_TYPES = ("lut", "tensor")
LUT_TOKENIZERS = ("noop",)
FUSE_METHODS = ("sum", "cross")  # the official ConditionFuser's "prepend" is rejected by it too
FUSER_OPTIONS = ("cross_attention_pos_emb", "cross_attention_pos_emb_scale")
HIBIKI_CONDITION = {"description": "very_good"}  # what the official loops ask a conditioned Hibiki for
HIBIKI_NEGATIVE = {"description": "very_bad"}  # and what classifier-free guidance steers it away from

Attributes = Mapping[str, Any]  # one batch item: condition name -> value (str, tensor, TensorValue or None)
CROSS_POS_MAX_PERIOD = 10_000.0  # the official fuser's position embedding of the cross source


@dataclass(frozen=True)
class TensorValue:
    """A tensor condition's value: vectors [L, E] and which of them are given, mask [L] bool (the
    others give the learnt padding, as the unused speaker places of a TTS voice)."""

    tensor: Any  # [L, E] (or [E]: L = 1)
    mask: Any = None  # [L] bool, None: all given


class ConditionError(UserError):
    """Condition values that a conditioned model cannot take; the message names the condition."""


@dataclass(frozen=True)
class ConditionerConfig:
    name: str
    type: str  # one of CONDITIONER_TYPES
    dim: int  # E: width of the table (lut) or of the given vectors (tensor)
    n_bins: int = 0  # lut: table rows, not counting the padding row
    tokenizer: str = "noop"  # lut: the whole value is one token
    possible_values: tuple[str, ...] | None = None  # lut: value i -> row i; None: hashed values
    init_scale: float = 1.0  # lut: scale of the initial table (irrelevant when loading weights)
    force_linear: bool = True  # project even when E == D
    learn_padding: bool = True  # absent values give a learnt vector (else zeros)
    pad_empty: bool = True  # accepted for compatibility: values always have length 1 here

    def to_dict(self) -> dict:
        """The official spelling: {"type": t, t: {...}}."""
        inner = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "type")}
        if self.type == "tensor":
            for key in ("n_bins", "tokenizer", "possible_values", "init_scale"):
                inner.pop(key)
        elif self.possible_values is not None:
            inner["possible_values"] = list(self.possible_values)
        return {"type": self.type, self.type: inner}


@dataclass(frozen=True)
class FuserConfig:
    sum: tuple[str, ...] = ()
    cross: tuple[str, ...] = ()
    cross_attention_pos_emb: bool = False
    cross_attention_pos_emb_scale: float = 1.0

    def to_dict(self) -> dict:
        return {"sum": list(self.sum), "cross": list(self.cross),
                "cross_attention_pos_emb": self.cross_attention_pos_emb,
                "cross_attention_pos_emb_scale": self.cross_attention_pos_emb_scale}


# ----------------------------------------------------------------------------- config parsing
# Errors are UserErrors naming the key; config.py turns them into ConfigErrors.

_COMMON_KEYS = ("dim", "force_linear", "learn_padding", "pad_empty", "output_bias")
_LUT_KEYS = _COMMON_KEYS + ("n_bins", "tokenizer", "possible_values", "init_scale")


def parse_conditioners(raw: Any) -> tuple[ConditionerConfig, ...]:
    """The official `conditioners` object -> one ConditionerConfig per named condition."""
    if not isinstance(raw, dict):
        raise UserError(f"config key 'conditioners' must be a JSON object, got {raw!r}")
    return tuple(_parse_conditioner(name, spec) for name, spec in raw.items())


def _parse_conditioner(name: str, spec: Any) -> ConditionerConfig:
    where = f"conditioners.{name}"
    if isinstance(spec, ConditionerConfig):
        return spec
    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError(f"config key {where!r} must be an object with a 'type', got {spec!r}")
    kind = spec["type"]
    if kind not in CONDITIONER_TYPES:
        raise UserError(f"{where}: unknown conditioner type {kind!r}, expected one of {CONDITIONER_TYPES}")
    extra = set(spec) - {"type", kind}
    if extra:
        raise UserError(f"{where}: unknown key {sorted(extra)[0]!r}")
    kwargs = dict(spec.get(kind) or {})
    allowed = _LUT_KEYS if kind == "lut" else _COMMON_KEYS
    for key in kwargs:
        if key not in allowed:
            raise UserError(f"{where}.{kind}: unknown key {key!r}")
    if kwargs.pop("output_bias", False):
        raise UserError(f"{where}.{kind}: output_bias=true is not supported (nor by the official code)")
    if not isinstance(kwargs.get("dim"), int) or kwargs["dim"] <= 0:
        raise UserError(f"{where}.{kind}: 'dim' must be a positive integer, got {kwargs.get('dim')!r}")
    if kind == "lut":
        if not isinstance(kwargs.get("n_bins"), int) or kwargs["n_bins"] <= 0:
            raise UserError(f"{where}.lut: 'n_bins' must be a positive integer, got {kwargs.get('n_bins')!r}")
        if kwargs.get("tokenizer") not in LUT_TOKENIZERS:
            raise UserError(f"{where}.lut: unknown tokenizer {kwargs.get('tokenizer')!r}, "
                            f"expected one of {LUT_TOKENIZERS}")
        values = kwargs.get("possible_values")
        if values is not None:
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise UserError(f"{where}.lut: 'possible_values' must be a list of strings")
            if len(values) > kwargs["n_bins"]:
                raise UserError(f"{where}.lut: {len(values)} possible_values do not fit n_bins={kwargs['n_bins']}")
            kwargs["possible_values"] = tuple(values)
    return ConditionerConfig(name=name, type=kind, **kwargs)


def parse_fuser(raw: Any) -> FuserConfig:
    """The official `fuser` object ({"sum": [...], "cross": [...], options}) -> FuserConfig."""
    if isinstance(raw, FuserConfig):
        return raw
    if not isinstance(raw, dict):
        raise UserError(f"config key 'fuser' must be a JSON object, got {raw!r}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in FUSE_METHODS:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise UserError(f"fuser.{key} must be a list of condition names, got {value!r}")
            kwargs[key] = tuple(value)
        elif key in FUSER_OPTIONS:
            kwargs[key] = value
        elif key == "prepend":
            if value:
                raise UserError("fuser method 'prepend' is not supported (nor by the official code); "
                                f"supported methods are {FUSE_METHODS}")
        else:
            raise UserError(f"unknown fuse method or fuser option {key!r}, expected one of "
                            f"{FUSE_METHODS + FUSER_OPTIONS}")
    return FuserConfig(**kwargs)


def check_fuser(conditioners: tuple[ConditionerConfig, ...] | None, fuser: FuserConfig | None) -> None:
    names = {c.name for c in conditioners or ()}
    for method in FUSE_METHODS:
        for name in getattr(fuser, method, ()):
            if name not in names:
                raise UserError(f"fuser.{method} names condition {name!r}, which is not in "
                                f"'conditioners' ({sorted(names)})")


# ----------------------------------------------------------------------------- modules


def hash_value(value: str, n_bins: int) -> int:
    """Row of a value in a table without possible_values: SHA-256 of its UTF-8 bytes mod n_bins
    (the official "hash trick"), so any string gets a stable row."""
    return int(hashlib.sha256(value.encode("utf-8")).hexdigest(), 16) % n_bins


class Conditioner(nn.Module):
    """One named condition: value per batch item -> [B, 1, D] (learnt padding where absent)."""

    def __init__(self, cfg: ConditionerConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.type == "lut":
            self.embed = nn.Embedding(cfg.n_bins + 1, cfg.dim)  # the last row is padding
            self.rows = {v: i for i, v in enumerate(cfg.possible_values or ())}
        if cfg.force_linear or cfg.dim != output_dim:
            self.output_proj = nn.Linear(cfg.dim, output_dim, bias=False)
        else:
            self.output_proj = nn.Identity()
        self.learnt_padding = nn.Parameter(torch.empty(1, 1, output_dim)) if cfg.learn_padding else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random values (the official init's scales); the embedding and projection have their own."""
        if self.cfg.type == "lut":
            self.embed.reset_parameters()
            with torch.no_grad():
                self.embed.weight.mul_(self.cfg.init_scale)
        if self.learnt_padding is not None:
            nn.init.normal_(self.learnt_padding, std=0.2)

    def prepare(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Host side: values (one per batch item, None when absent) -> (input, present).
        A lut gives row ids [B] and present [B]; a tensor conditioner vectors [B, L, E] and present
        [B, L], L the longest value (shorter ones padded, as the official collation)."""
        cfg = self.cfg
        device = _device(self)
        if cfg.type == "lut":
            present = torch.tensor([v is not None for v in values], dtype=torch.bool, device=device)
            rows = [cfg.n_bins if v is None else self._row(v) for v in values]
            return torch.tensor(rows, dtype=torch.long, device=device), present
        items = [self._sequence(v) for v in values]
        L = max(x.shape[0] for x, _ in items)
        vectors = torch.zeros(len(items), L, cfg.dim)
        present = torch.zeros(len(items), L, dtype=torch.bool)
        for b, (x, m) in enumerate(items):
            vectors[b, :x.shape[0]] = x
            present[b, :x.shape[0]] = m
        return vectors.to(device), present.to(device)

    def _sequence(self, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A tensor condition's value -> (vectors [L, E] float32, given [L] bool)."""
        cfg = self.cfg
        if value is None:
            return torch.zeros(1, cfg.dim), torch.zeros(1, dtype=torch.bool)
        mask = None
        if isinstance(value, TensorValue):
            value, mask = value.tensor, value.mask
        try:
            x = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ConditionError(f"condition {cfg.name!r} takes vectors of {cfg.dim} values, got {type(value).__name__}") from None
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] != cfg.dim or x.shape[0] == 0:
            raise ConditionError(f"condition {cfg.name!r} takes vectors of {cfg.dim} values ([{cfg.dim}] or "
                                 f"[L, {cfg.dim}]), got a tensor of shape {list(x.shape)}")
        m = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu()
        if m.shape != (x.shape[0],):
            raise ConditionError(f"condition {cfg.name!r}: the mask has shape {list(m.shape)}, the vectors {list(x.shape)}")
        return x, m

    def _row(self, value: str) -> int:
        cfg = self.cfg
        if not isinstance(value, str):
            raise ConditionError(f"condition {cfg.name!r} takes a string, got {value!r}")
        if cfg.possible_values is None:
            return hash_value(value, cfg.n_bins)
        if value not in self.rows:
            raise ConditionError(f"{value!r} is not a possible value of condition {cfg.name!r}: "
                                 f"{list(cfg.possible_values)} (or None for no condition)")
        return self.rows[value]

    def forward(self, inputs: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(ids [B] and present [B]) or (vectors [B, L, E] and present [B, L]) -> [B, L, D]."""
        if self.cfg.type == "lut":
            x, present = self.embed(inputs)[:, None], present[:, None]  # [B, 1, E], [B, 1]
        else:
            x = inputs.to(_dtype(self))
        y = self.output_proj(x)  # [B, L, D]
        pad = torch.zeros_like(y) if self.learnt_padding is None else self.learnt_padding
        return torch.where(present[..., None], y, pad)


class ConditionProvider(nn.Module):
    """All the conditioners of an LM and the fusion of their outputs ("sum" and "cross")."""

    def __init__(self, conditioners: tuple[ConditionerConfig, ...], fuser: FuserConfig | None, output_dim: int):
        super().__init__()
        self.conditioners = nn.ModuleDict({c.name: Conditioner(c, output_dim) for c in conditioners})
        self.fuser = fuser or FuserConfig()
        self.sum_names = self.fuser.sum
        self.output_dim = output_dim
        for name in self.sum_names + self.fuser.cross:
            if name not in self.conditioners:
                raise ConditionError(f"the fuser names condition {name!r}, which has no conditioner")

    def _check(self, attributes: Sequence[Attributes]) -> None:
        known = set(self.conditioners)
        for b, attrs in enumerate(attributes):
            unknown = set(attrs) - known
            if unknown:
                raise ConditionError(f"unknown condition {sorted(unknown)[0]!r} in batch item {b}; "
                                     f"this model has {sorted(known)}")
            missing = known - set(attrs)
            if missing:
                raise ConditionError(f"batch item {b} has no value for condition {sorted(missing)[0]!r} "
                                     f"(give None for no condition)")

    def forward(self, attributes: Sequence[Attributes]) -> torch.Tensor:
        """One mapping of condition values per batch item -> the summed condition [B, 1, D] in
        float32 (zeros when the fuser sums nothing). Every conditioner needs a value; None means
        "no condition" (learnt padding)."""
        self._check(attributes)
        total = torch.zeros(len(attributes), 1, self.output_dim, device=_device(self), dtype=_dtype(self))
        for name in self.sum_names:
            conditioner = self.conditioners[name]
            c = conditioner(*conditioner.prepare([attrs[name] for attrs in attributes]))
            if c.shape[1] != 1:
                raise ConditionError(f"condition {name!r} is summed into every frame: it takes one vector, got {c.shape[1]}")
            total = total + c
        return total

    def cross(self, attributes: Sequence[Attributes]) -> torch.Tensor:
        """One mapping of condition values per batch item -> the cross-attention source [B, L, D]
        in float32: the "cross" conditions concatenated along L, plus the position embedding."""
        self._check(attributes)
        if not self.fuser.cross:
            raise ConditionError("this model fuses no condition by cross-attention (fuser.cross)")
        parts = []
        for name in self.fuser.cross:
            conditioner = self.conditioners[name]
            parts.append(conditioner(*conditioner.prepare([attrs[name] for attrs in attributes])))
        src = torch.cat(parts, dim=1)  # [B, L, D]
        if self.fuser.cross_attention_pos_emb:
            positions = torch.arange(src.shape[1], device=src.device)[None]  # [1, L]
            pos = sin_embedding(positions, src.shape[-1], CROSS_POS_MAX_PERIOD, torch.float32).to(src.dtype)
            src = src + self.fuser.cross_attention_pos_emb_scale * pos
        return src


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)
