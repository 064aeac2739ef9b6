"""The user's side of a turn: when the client's speech starts and stops (`server_vad`).

A voice activity detector gives a speech probability for every 32 ms of input (512 samples at
16 kHz): Silero VAD (the `silero-vad` package, which ships its model) when it is installed, else a
plain energy gate (`energy_probability`). `SpeechDetector` turns the probabilities into events as
OpenAI's server VAD describes them:

- speech starts at the first chunk whose probability reaches `threshold`; its `audio_start_ms`
  is that chunk's start less `prefix_padding_ms`;
- speech stops once the probability has stayed below `threshold - 0.15` (hysteresis) for
  `silence_duration_ms`; its `audio_end_ms` is the end of the last speech chunk.

Times count the milliseconds of audio the client has appended since the session began.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from openmoshi.serving.realtime.formats import MIMI_RATE, Resampler

log = logging.getLogger("openmoshi.serving.realtime")

VAD_RATE = 16000
CHUNK = 512  # samples at 16 kHz per probability (32 ms), what Silero VAD takes
HYSTERESIS = 0.15  # speech goes on while the probability stays above threshold - HYSTERESIS
ENERGY_FLOOR_DBFS = -50.0  # energy gate: probability 0 at or below this level ...
ENERGY_FULL_DBFS = -30.0  # ... and 1 at or above this one


@dataclass(frozen=True)
class TurnDetection:
    """`session.audio.input.turn_detection`: None type means no VAD events (the client commits)."""

    type: str | None = "server_vad"  # server_vad, semantic_vad (the STT's pause head, else as server_vad) or None
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def to_dict(self) -> dict | None:
        if self.type is None:
            return None
        return {"type": self.type, "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": True,
                "interrupt_response": False}


def energy_probability(chunk: np.ndarray) -> float:
    """A speech 'probability' from loudness alone: 0 below -50 dBFS, 1 above -30 dBFS, linear between."""
    dbfs = 10 * np.log10(float(np.mean(chunk.astype(np.float64) ** 2)) + 1e-12)
    return float(np.clip((dbfs - ENERGY_FLOOR_DBFS) / (ENERGY_FULL_DBFS - ENERGY_FLOOR_DBFS), 0.0, 1.0))


def _silero():
    """A fresh Silero VAD model (its own recurrent state), or None when the package is missing."""
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        return None
    return load_silero_vad()


_warned = False


class SpeechDetector:
    """Feed 24 kHz PCM as it arrives; get ("speech_started", audio_start_ms) and
    ("speech_stopped", audio_end_ms) events."""

    def __init__(self, config: TurnDetection = TurnDetection()):
        global _warned
        self.config = config
        self.model = _silero()
        if self.model is None and not _warned:
            _warned = True
            log.warning("silero-vad is not installed (pip install 'openmoshi[realtime]'): "
                        "the realtime endpoint detects speech by its loudness alone")
        self.resample = Resampler(MIMI_RATE, VAD_RATE)
        self.pending = np.zeros(0, dtype=np.float32)
        self.chunks = 0  # chunks scored so far
        self.speaking = False
        self.last_speech_end_ms = 0.0  # end of the last chunk above the threshold
        self.silent_ms = 0.0

    def probability(self, chunk: np.ndarray) -> float:
        if self.model is None:
            return energy_probability(chunk)
        import torch

        with torch.inference_mode():
            return float(self.model(torch.from_numpy(chunk), VAD_RATE))

    def end_speech(self) -> None:
        """The turn ended elsewhere (semantic_vad: the STT's pause head): listen for the next speech."""
        self.speaking, self.silent_ms = False, 0.0

    def feed(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        events = []
        x = np.concatenate([self.pending, self.resample(pcm)])
        whole = x.size - x.size % CHUNK
        self.pending = x[whole:]
        chunk_ms = 1000.0 * CHUNK / VAD_RATE
        for i in range(0, whole, CHUNK):
            p = self.probability(x[i:i + CHUNK])
            start_ms = self.chunks * chunk_ms
            self.chunks += 1
            if not self.speaking and p >= self.config.threshold:
                self.speaking, self.silent_ms = True, 0.0
                self.last_speech_end_ms = start_ms + chunk_ms
                events.append(("speech_started", int(max(0.0, start_ms - self.config.prefix_padding_ms))))
            elif self.speaking:
                if p >= self.config.threshold - HYSTERESIS:
                    self.silent_ms = 0.0
                    self.last_speech_end_ms = start_ms + chunk_ms
                else:
                    self.silent_ms += chunk_ms
                    if self.silent_ms >= self.config.silence_duration_ms:
                        self.speaking = False
                        events.append(("speech_stopped", int(self.last_speech_end_ms)))
        return events
