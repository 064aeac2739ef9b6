"""What a client may set, checked at the edge: the query parameters of a conversation, read into
the values the model loop will write into its slot's tensors.

    sampling = sampling_from_query(query, default)   # SamplingConfig: float32 / int64 ranges checked
    seeds = seeds_from_query(query)                   # (text seed, audio seed) or None

Every value is refused here, with a message that quotes what the client sent, unless it is one
the model loop can hold: a plain ASCII number (no `1_000`, no other scripts' digits, no `inf`),
given once, in the range its setting allows (`sampling.LIMITS`). A refused query never reaches the
model loop. Unknown parameters are ignored, as the official server does (clients add their own).
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import replace

from openmoshi.errors import UserError
from openmoshi.lm.sampling import SamplingConfig

# Official web client parameter -> SamplingConfig field.
SAMPLING_PARAMS = {"text_temperature": "temp_text", "text_topk": "top_k_text", "audio_temperature": "temp",
                   "audio_topk": "top_k", "pad_mult": "pad_mult", "repetition_penalty": "repetition_penalty",
                   "repetition_penalty_context": "repetition_context"}
# The seeds of a conversation's own random streams (each slot samples from its own, see serving.loop).
SEED_PARAMS = ("text_seed", "audio_seed")
ONE_SEED = "seed"  # PersonaPlex's client: one seed for both streams
SEED_LIMIT = 2 ** 62  # seeds live in int64 tensors, and hashing adds to them

MAX_NUMBER_CHARS = 32  # longer than any number a setting takes
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_DIGITS = re.compile(r"[+-]?\d+", re.ASCII)
_INT_FIELDS = {"top_k", "top_k_text", "repetition_context"}


def quoted(raw: str) -> str:
    """A client's value as an error message shows it: quoted, and cut when long."""
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


def one_value(query, name: str) -> str | None:
    """The value of `name` (None when absent or empty); ValueError when it is given more than once
    with different values, since which one would count is anybody's guess."""
    values = query.getlist(name) if hasattr(query, "getlist") else [query[name]] if name in query else []
    values = [v for v in values if v != ""]
    if len(set(values)) > 1:
        raise UserError(f"query parameter {name} is given {len(values)} times "
                         f"({', '.join(quoted(v) for v in values[:3])}): give it once")
    return values[0] if values else None


def parse_number(name: str, raw: str, integer: bool) -> int | float:
    """A query value as a number, strictly: ASCII digits, optional sign, point and exponent; an
    integer setting takes integral values only ("100.0" and "1e2" are 100, JavaScript's way)."""
    if raw.strip().lstrip("+-").lower() in ("inf", "infinity", "nan"):
        raise UserError(f"query parameter {name}={quoted(raw)} must be finite")
    if len(raw) > MAX_NUMBER_CHARS or not _FLOAT.fullmatch(raw):
        raise UserError(f"query parameter {name}={quoted(raw)} is not {'an integer' if integer else 'a number'} "
                         f"(ASCII digits, at most {MAX_NUMBER_CHARS} characters)")
    value = float(raw)  # inf beyond the double range: refused by the setting's range
    if not integer:
        return value
    if _DIGITS.fullmatch(raw):
        return int(raw)  # exact, however long (the range check quotes it)
    if math.isfinite(value) and not value.is_integer():
        raise UserError(f"query parameter {name}={quoted(raw)} is not an integer")
    if not abs(value) < 2 ** 63:
        raise UserError(f"query parameter {name}={quoted(raw)} is out of range (far too large)")
    return int(value)


def sampling_from_query(query, default: SamplingConfig) -> SamplingConfig:
    """The official client's settings as a SamplingConfig; ValueError with a readable message."""
    sampling = default
    for name, field in SAMPLING_PARAMS.items():
        raw = one_value(query, name)
        if raw is None:
            continue
        value = parse_number(name, raw, field in _INT_FIELDS)
        try:
            sampling = replace(sampling, **{field: value})  # SamplingConfig checks the ranges
        except ValueError as e:
            raise UserError(f"query parameter {name}={quoted(raw)} is out of range: {e}") from None
    return sampling


def seeds_from_query(query) -> tuple[int, int] | None:
    """(text seed, audio seed) when the client gives one or both (the other one random); None:
    random seeds, new at each restart. ValueError with a readable message."""
    given = {}
    for name in (ONE_SEED, *SEED_PARAMS):
        raw = one_value(query, name)
        if raw is None:
            continue
        if len(raw) > MAX_NUMBER_CHARS or not raw.isascii() or not raw.isdigit():
            raise UserError(f"query parameter {name}={quoted(raw)} must be an integer")
        value = int(raw)
        if value >= SEED_LIMIT:
            raise UserError(f"query parameter {name}={quoted(raw)} must be between 0 and 2^62")
        given[name] = value
    if not given:
        return None
    one = given.get(ONE_SEED)
    return tuple(given.get(name, secrets.randbits(62) if one is None else one) for name in SEED_PARAMS)
