"""G.711 (ITU-T, 1972) telephone audio: 8-bit mu-law and A-law samples <-> 16-bit linear PCM.

The OpenAI Realtime API calls them `audio/pcmu` (mu-law, North America and Japan) and `audio/pcma`
(A-law, elsewhere), both at 8 kHz. Each 8-bit code is a sign, a 3-bit segment (a power of two)
and a 4-bit step within it: the segments give about 13 bits of dynamic range. Decoding is a
256-entry table; encoding a 65536-entry table over every int16 value, both built once on first use.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

ULAW, ALAW = "ulaw", "alaw"
_ULAW_BIAS = 0x84  # added before the segment search so that every segment starts at a power of two
_ULAW_CLIP = 32635  # the largest magnitude mu-law represents, before the bias
_ALAW_BOUNDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)  # segment ends of 13-bit magnitudes


def _ulaw_from_linear(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int32) >> 2  # 14-bit, rounded down (as the reference coders do for negatives)
    negative = x < 0
    magnitude = np.minimum(np.where(negative, -x, x), _ULAW_CLIP >> 2) + (_ULAW_BIAS >> 2)
    segment = np.floor(np.log2(magnitude)).astype(np.int32) - 5  # 0..7
    step = (magnitude >> (segment + 1)) & 0x0F
    code = (segment << 4) | step | np.where(negative, 0x80, 0)
    return (~code & 0xFF).astype(np.uint8)  # transmitted inverted


def _linear_from_ulaw(code: np.ndarray) -> np.ndarray:
    c = ~code.astype(np.int32) & 0xFF
    magnitude = (((c & 0x0F) << 3) + _ULAW_BIAS) << ((c >> 4) & 0x07)
    return np.where(c & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def _alaw_from_linear(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int32) >> 3  # 13-bit
    negative = x < 0
    magnitude = np.where(negative, -x - 1, x)
    segment = np.searchsorted(np.array(_ALAW_BOUNDS), magnitude)  # first bound >= magnitude
    step = np.where(segment < 2, magnitude >> 1, magnitude >> np.maximum(segment, 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | step)
    return (code ^ np.where(negative, 0x55, 0xD5)).astype(np.uint8)  # even bits inverted, sign set for >= 0


def _linear_from_alaw(code: np.ndarray) -> np.ndarray:
    c = code.astype(np.int32) ^ 0x55
    segment = (c >> 4) & 0x07
    t = ((c & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
    return np.where(c & 0x80, t, -t).astype(np.int16)


@lru_cache(maxsize=None)
def _tables(law: str) -> tuple[np.ndarray, np.ndarray]:
    """(encode table indexed by int16 + 32768, decode table indexed by the code)."""
    if law not in (ULAW, ALAW):
        raise ValueError(f"unknown G.711 law {law!r}: use {ULAW!r} or {ALAW!r}")
    linear = np.arange(-32768, 32768, dtype=np.int32)
    codes = np.arange(256, dtype=np.uint8)
    if law == ULAW:
        return _ulaw_from_linear(linear), _linear_from_ulaw(codes)
    return _alaw_from_linear(linear), _linear_from_alaw(codes)


def encode(pcm16: np.ndarray, law: str) -> bytes:
    """int16 samples -> one G.711 byte per sample."""
    table, _ = _tables(law)
    return table[pcm16.astype(np.int32) + 32768].tobytes()


def decode(data: bytes, law: str) -> np.ndarray:
    """G.711 bytes -> int16 samples."""
    _, table = _tables(law)
    return table[np.frombuffer(data, dtype=np.uint8)]
