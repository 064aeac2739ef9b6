"""The audio formats of the Realtime API and their conversion to and from Mimi's 24 kHz PCM.

    {"type": "audio/pcm", "rate": 24000}   16-bit little-endian mono at 24 kHz (Mimi's own rate: no conversion)
    {"type": "audio/pcmu"}                 G.711 mu-law at 8 kHz (beta name "g711_ulaw")
    {"type": "audio/pcma"}                 G.711 A-law at 8 kHz  (beta name "g711_alaw")

Telephone audio is resampled 8 kHz <-> 24 kHz at the edge by a streaming polyphase filter
(`Resampler`: a Kaiser-windowed sinc, so that 24 kHz speech sent to an 8 kHz client is low-passed
below 4 kHz rather than folded onto itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np

from openmoshi.serving.realtime import g711

MIMI_RATE = 24000
PCM, PCMU, PCMA = "audio/pcm", "audio/pcmu", "audio/pcma"
TELEPHONE_RATE = 8000
_BETA_NAMES = {"pcm16": PCM, "g711_ulaw": PCMU, "g711_alaw": PCMA}
_LAW = {PCMU: g711.ULAW, PCMA: g711.ALAW}
ZERO_CROSSINGS = 16  # of the resampling filter's sinc on each side: ~2 ms of delay at 8 kHz
ROLLOFF = 0.9  # cutoff as a fraction of the lower Nyquist frequency
KAISER_BETA = 8.0


@dataclass(frozen=True)
class AudioFormat:
    type: str = PCM
    rate: int = MIMI_RATE

    def to_dict(self) -> dict:
        return {"type": self.type, "rate": self.rate} if self.type == PCM else {"type": self.type}

    @property
    def beta_name(self) -> str:
        return next(name for name, kind in _BETA_NAMES.items() if kind == self.type)


def _short(value) -> str:
    text = repr(value)  # a client's value, shown in an error: cut when long
    return text if len(text) <= 60 else text[:57] + "..."


def parse_format(value) -> AudioFormat:
    """A GA format object ({"type": "audio/pcm", "rate": 24000}) or a beta name ("pcm16",
    "g711_ulaw", "g711_alaw"); ValueError with a readable message."""
    if isinstance(value, str):
        if value not in _BETA_NAMES:
            raise ValueError(f"unknown audio format {_short(value)}: use one of {sorted(_BETA_NAMES)}")
        value = {"type": _BETA_NAMES[value]}
    if not isinstance(value, dict) or value.get("type") not in (PCM, PCMU, PCMA):
        raise ValueError(f"unknown audio format {_short(value)}: use type audio/pcm (24 kHz), audio/pcmu or audio/pcma")
    if value["type"] == PCM:
        rate = value.get("rate", MIMI_RATE)
        if rate != MIMI_RATE:
            raise ValueError(f"audio/pcm must be at {MIMI_RATE} Hz, got rate {_short(rate)}")
        return AudioFormat(PCM, MIMI_RATE)
    return AudioFormat(value["type"], TELEPHONE_RATE)


class Resampler:
    """Streaming resampling by a rational ratio: feed chunks of any size, get every output sample
    whose inputs have arrived. Output sample n is the input, upsampled by `up` (zeros between),
    low-passed and taken every `down`-th sample: sum_j h[p + up * j] x[(n * down) // up - j] with
    phase p = (n * down) % up."""

    def __init__(self, from_rate: int, to_rate: int):
        g = gcd(from_rate, to_rate)
        self.up, self.down = to_rate // g, from_rate // g
        half = ZERO_CROSSINGS * max(self.up, self.down)
        t = np.arange(-half, half + 1, dtype=np.float64)
        cutoff = ROLLOFF * 0.5 / max(self.up, self.down)  # cycles per sample at the upsampled rate
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(t.size, KAISER_BETA) * self.up
        taps = -(-h.size // self.up)  # per phase
        h = np.concatenate([h, np.zeros(taps * self.up - h.size)])
        phases = h.reshape(taps, self.up).T  # [up, taps]: phases[p, j] = h[p + up * j]
        self.phases = (phases / phases.sum(axis=1, keepdims=True)).astype(np.float32)  # unit gain at 0 Hz
        self.history = np.zeros(taps - 1, dtype=np.float32)
        self.seen = 0  # input samples consumed
        self.next = 0  # index of the next output sample

    def __call__(self, x: np.ndarray) -> np.ndarray:
        taps = self.phases.shape[1]
        buf = np.concatenate([self.history, x.astype(np.float32)])
        start = self.seen - self.history.size  # input index of buf[0]
        self.seen += x.size
        last = (self.seen * self.up - 1) // self.down  # the last output whose newest input has arrived
        n = np.arange(self.next, last + 1)
        self.next = last + 1
        self.history = buf[buf.size - (taps - 1):]
        if n.size == 0:
            return np.zeros(0, dtype=np.float32)
        m = n * self.down
        newest = m // self.up - start  # position in buf of x[(n * down) // up]
        windows = np.lib.stride_tricks.sliding_window_view(buf, taps)[newest - taps + 1]  # [N, taps], oldest first
        return np.einsum("nt,nt->n", windows[:, ::-1], self.phases[m % self.up]).astype(np.float32)


class InputDecoder:
    """Client audio (the bytes of `input_audio_buffer.append`) -> float32 PCM at 24 kHz."""

    def __init__(self, fmt: AudioFormat):
        self.format = fmt
        self.odd = b""  # half a 16-bit sample left over from the previous chunk
        self.resample = None if fmt.type == PCM else Resampler(TELEPHONE_RATE, MIMI_RATE)

    def __call__(self, data: bytes) -> np.ndarray:
        if self.format.type == PCM:
            data, self.odd = self.odd + data, b""
            if len(data) % 2:
                data, self.odd = data[:-1], data[-1:]
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        pcm = g711.decode(data, _LAW[self.format.type]).astype(np.float32) / 32768.0
        return self.resample(pcm)


class OutputEncoder:
    """Mimi's float32 PCM at 24 kHz -> the bytes of `response.output_audio.delta`."""

    def __init__(self, fmt: AudioFormat):
        self.format = fmt
        self.resample = None if fmt.type == PCM else Resampler(MIMI_RATE, TELEPHONE_RATE)

    def __call__(self, pcm: np.ndarray) -> bytes:
        if self.format.type != PCM:
            pcm = self.resample(pcm)
        pcm16 = np.clip(np.round(pcm * 32768.0), -32768, 32767).astype("<i2")
        if self.format.type == PCM:
            return pcm16.tobytes()
        return g711.encode(pcm16, _LAW[self.format.type])

    def ms(self, n_bytes: int) -> float:
        """Milliseconds of audio in `n_bytes` of this format."""
        per_second = self.format.rate * (2 if self.format.type == PCM else 1)
        return 1000.0 * n_bytes / per_second
