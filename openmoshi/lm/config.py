"""LM configuration: frozen dataclasses built from the official flat JSON in one place.

The official `config.json` mixes the LM constructor arguments (`dim`, `dep_q`, `depformer_*`, ...)
with file names and run settings (`moshi_name`, `lm_gen_config`, ...). `parse_model_config`
splits them; `lm_config_from_dict` turns the LM part into an `LMConfig`, with the same defaults as
the official `LMModel` for keys that are absent, and rejects unknown or inconsistent keys with a
message that names the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from openmoshi.errors import UserError
from openmoshi.lm.conditioners import ConditionerConfig, FuserConfig, check_fuser, parse_conditioners, parse_fuser
from openmoshi.modules.transformer import TransformerConfig

# Special token ids and values (official LMModel).
ZERO_TOKEN = -1  # "no input": contributes a zero embedding, no loss, nothing sampled
UNGENERATED_TOKEN = -2  # "to be generated"
TEXT_PADDING_ID = 3  # existing_text_padding_id in the released models
TEXT_END_PADDING_ID = 0  # marks the last padding step before a word
TEXT_EOS_ID = 2  # the text tokenizer's end of sequence (Hibiki ends its translation with it)

MODEL_TYPES = ("moshi", "hibiki", "stt", "tts")


class ConfigError(UserError):
    """A model configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class LMConfig:
    """The Moshi LM: a temporal transformer over 1 text + n_q audio streams, a depth transformer
    ("depformer") predicting dep_q audio codebooks per frame. Defaults are the official LMModel's."""

    delays: tuple[int, ...] = (0,)
    n_q: int = 8
    dep_q: int = 8
    card: int = 1024
    text_card: int = 32000
    text_card_out: int | None = None
    demux_second_text_stream: bool = False
    dim: int = 128
    num_heads: int = 8
    num_layers: int | None = None  # required: the official LMModel has no default either
    hidden_scale: float = 4
    norm: str = "layer_norm"
    norm_emb: bool = False
    bias_proj: bool = False
    causal: bool = True
    context: int | None = None
    max_period: float = 10_000.0
    gating: str = "none"
    positional_embedding: str = "sin"
    layer_scale: float | None = None
    kv_repeat: int = 1
    existing_text_padding_id: int = TEXT_PADDING_ID
    existing_text_end_padding_id: int = TEXT_END_PADDING_ID
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    depformer_dim: int = 256
    depformer_dim_feedforward: int | None = None
    depformer_num_heads: int | None = None  # None: same as num_heads
    depformer_num_layers: int | None = None  # None: same as num_layers
    depformer_multi_linear: bool = False
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    depformer_low_rank_embeddings: int | None = None
    depformer_pos_emb: str = "sin"
    depformer_norm: str | None = None
    depformer_max_period: float | None = None
    depformer_gating: str | None = None
    # "main": the temporal transformer's (what an absent key means); an explicit null: none, as the
    # official code reads every depformer_* key present, null included
    depformer_layer_scale: float | None | str = "main"
    depformer_kv_repeat: int | None = None
    depformer_context: int | None = None  # accepted for compatibility; the official code ignores it
    # Not an official key. PersonaPlex (dep_q = 16 = n_q): the last depformer_user_slots depth
    # slots are the user's codebooks, which inference takes from the input (forced), never samples.
    depformer_user_slots: int = 0
    conditioners: tuple[ConditionerConfig, ...] | None = None  # see conditioners.py
    fuser: FuserConfig | None = None
    # Kyutai TTS: the temporal transformer's layers attend to the conditions the fuser puts in
    # "cross" (the speaker embeddings), see modules/transformer.py.
    cross_attention: bool = False

    def __post_init__(self):
        if self.num_layers is None:
            raise ConfigError("missing required LM config key 'num_layers'")
        if len(self.delays) != self.n_q + 1:
            raise ConfigError(f"delays has {len(self.delays)} entries but n_q={self.n_q} needs "
                              f"n_q + 1 = {self.n_q + 1} (one for text, one per audio codebook)")
        if any(d < 0 for d in self.delays):
            raise ConfigError(f"delays must be >= 0, got {list(self.delays)}")
        if not 0 <= self.dep_q <= self.n_q:
            raise ConfigError(f"dep_q={self.dep_q} must be between 0 and n_q={self.n_q}")
        if not 0 <= self.depformer_user_slots <= self.dep_q or (
                self.depformer_user_slots and self.gen_q + self.depformer_user_slots != self.n_q):
            raise ConfigError(f"depformer_user_slots={self.depformer_user_slots}: the depth slots after the "
                              f"model's codebooks must be all the user's (dep_q={self.dep_q}, n_q={self.n_q})")
        sched = self.depformer_weights_per_step_schedule
        if sched is not None and len(sched) != self.dep_q:
            raise ConfigError(f"depformer_weights_per_step_schedule has {len(sched)} entries, "
                              f"expected dep_q={self.dep_q}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} is not a multiple of num_heads={self.num_heads}")
        crossed = bool(self.fuser and self.fuser.cross)
        if self.cross_attention != crossed:
            raise ConfigError("cross_attention=true needs conditions fused by cross-attention (fuser.cross)"
                              if self.cross_attention else
                              f"fuser.cross {list(self.fuser.cross)} needs cross_attention=true")
        try:
            self.temporal, self.depth  # validate both transformer configs now (plain ValueErrors)
            check_fuser(self.conditioners, self.fuser)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def num_codebooks(self) -> int:
        """Streams in the model's input: text + n_q audio."""
        return self.n_q + 1

    @property
    def gen_q(self) -> int:
        """Audio codebooks the model generates: dep_q, less the depth slots of the user's (PersonaPlex)."""
        return self.dep_q - self.depformer_user_slots

    @property
    def num_user_codebooks(self) -> int:
        return self.n_q - self.gen_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def initial_token(self) -> int:
        return self.card

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def text_out_card(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def temporal(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), causal=self.causal, context=self.context,
            norm=self.norm, gating=self.gating, positional_embedding=self.positional_embedding,
            max_period=self.max_period, layer_scale=self.layer_scale, kv_repeat=self.kv_repeat,
            cross_attention=self.cross_attention)

    @property
    def depth(self) -> TransformerConfig:
        """The depth transformer: main settings unless a depformer_* key overrides them; no window."""
        d = self.depformer_dim
        ff = self.depformer_dim_feedforward
        return TransformerConfig(
            d_model=d,
            num_heads=self.depformer_num_heads or self.num_heads,
            num_layers=self.depformer_num_layers or self.num_layers,
            dim_feedforward=int(self.hidden_scale * d) if ff is None else ff,
            causal=self.causal, context=None, norm=self.norm,
            gating=self.depformer_gating or self.gating,
            positional_embedding=self.depformer_pos_emb,
            max_period=self.depformer_max_period or self.max_period,
            layer_scale=self.layer_scale if self.depformer_layer_scale == "main" else self.depformer_layer_scale,
            kv_repeat=self.depformer_kv_repeat or self.kv_repeat,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule)

    def to_dict(self) -> dict:
        """The official flat keys (what lm_config_from_dict reads back)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "depformer_layer_scale" and v == "main":
                continue  # an absent key is how the official config says "the main one"
            if f.name in ("depformer_user_slots", "cross_attention") and not v:
                continue  # ours, or absent from every config but the TTS models'
            if f.name == "conditioners" and v is not None:
                v = {c.name: c.to_dict() for c in v}
            elif f.name == "fuser" and v is not None:
                v = v.to_dict()
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# Keys of config.json that are not LM constructor arguments.
RUN_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name",
            "model_type", "lm_gen_config", "tts_config", "stt_config", "model_id")
LORA_KEYS = ("lora", "lora_rank", "lora_scaling")
DEPRECATED_KEYS = ("depformer_causal",)  # the official loader drops these
RENAMED_KEYS = {"demux_second_stream": "demux_second_text_stream"}
_TUPLE_KEYS = ("delays", "depformer_weights_per_step_schedule")
_INT_KEYS = ("n_q", "dep_q", "card", "text_card", "dim", "num_heads", "num_layers", "depformer_dim")


def lm_config_from_dict(raw: dict) -> LMConfig:
    """The official LM kwargs (flat keys) -> LMConfig. Unknown keys raise ConfigError naming them."""
    known = {f.name for f in fields(LMConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key = RENAMED_KEYS.get(key, key)
        if key in DEPRECATED_KEYS or key in RUN_KEYS or key in LORA_KEYS:
            continue
        if key not in known:
            raise ConfigError(f"unknown LM config key {key!r}")
        if key in _TUPLE_KEYS and value is not None:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
                raise ConfigError(f"config key {key!r} must be a list of integers, got {value!r}")
            value = tuple(value)
        if key in _INT_KEYS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"config key {key!r} must be a non-negative integer, got {value!r}")
        if key in ("conditioners", "fuser") and value is not None:
            try:
                value = parse_conditioners(value) if key == "conditioners" else parse_fuser(value)
            except UserError as e:
                raise ConfigError(str(e)) from None
        kwargs[key] = value
    return LMConfig(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Everything a config.json says: the LM config plus file names and run settings."""

    lm: LMConfig
    model_type: str = "moshi"
    moshi_name: str = "model.safetensors"
    mimi_name: str = "tokenizer-e351c8d8-checkpoint125.safetensors"
    tokenizer_name: str = "tokenizer_spm_32k_3.model"
    mimi_config_name: str | None = None
    lora_name: str | None = None
    lora: bool = False
    lora_rank: int = 128
    lora_scaling: float = 2.0
    lm_gen_config: dict = field(default_factory=dict)
    stt_config: dict = field(default_factory=dict)
    tts_config: dict = field(default_factory=dict)
    model_id: dict = field(default_factory=dict)

    @property
    def mimi_codebooks(self) -> int:
        """How many Mimi codebooks the LM reads or writes (as the official loader computes it)."""
        n = max(self.lm.gen_q, self.lm.num_user_codebooks)
        return n // 2 if self.tts_config.get("multistream") else n


def parse_model_config(raw: dict) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
    lm = lm_config_from_dict(raw)
    extra = {k: raw[k] for k in RUN_KEYS + LORA_KEYS if k in raw}
    model_type = extra.get("model_type", "moshi")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {model_type!r}, expected one of {MODEL_TYPES}")
    if model_type == "moshi" and lm.dep_q == lm.n_q and lm.n_q % 2 == 0 and "depformer_user_slots" not in raw:
        # A speech-to-speech Moshi whose depth transformer covers every stream: PersonaPlex's
        # layout, the user's half forced from the input.
        lm = replace(lm, depformer_user_slots=lm.n_q // 2)
    for key in ("lm_gen_config", "stt_config", "tts_config", "model_id"):
        if key in extra and not isinstance(extra[key], dict):
            raise ConfigError(f"config key {key!r} must be a JSON object")
    return ModelConfig(lm=lm, **extra)


def load_model_config(path: str | Path) -> ModelConfig:
    """Reads a config.json; errors name the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    try:
        return parse_model_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# The released Moshi 7B (a repository without config.json is this model).
MOSHI_7B = lm_config_from_dict({
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8,
    "card": 2048, "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True,
    "layer_scale": None, "context": 3000, "max_period": 10000, "gating": "silu",
    "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224, "depformer_num_heads": 16, "depformer_num_layers": 6,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
})


# Small LMs with the 7B's structure, for demos, tests and CPU benchmarks (random weights).
_SMALL_BASE = {k: v for k, v in MOSHI_7B.to_dict().items() if v is not None}
TINY = lm_config_from_dict({**_SMALL_BASE, "dim": 128, "num_heads": 4, "num_layers": 2, "text_card": 1000,
                            "depformer_dim": 64, "depformer_dim_feedforward": 256, "depformer_num_heads": 2,
                            "depformer_num_layers": 1})
SMALL = lm_config_from_dict({**_SMALL_BASE, "dim": 512, "num_heads": 8, "num_layers": 6, "text_card": 32000,
                             "depformer_dim": 256, "depformer_dim_feedforward": 1056, "depformer_num_heads": 4,
                             "depformer_num_layers": 2})
# NVIDIA's PersonaPlex (nvidia/personaplex-7b-v1): the 7B with depth slots for the user's 8
# codebooks too; its repository has no config.json (its loader hard-codes this).
PERSONAPLEX_7B = replace(MOSHI_7B, dep_q=16, depformer_user_slots=8)
BUILTIN_CONFIGS = {"moshi_7b": MOSHI_7B, "personaplex_7b": PERSONAPLEX_7B, "tiny": TINY, "small": SMALL}
