"""Streaming Ogg/Opus at 24 kHz mono, one encoder and one decoder per conversation.

Both wrap `sphn` (Rust bindings to libopus and an Ogg muxer/demuxer), which the official server uses
too. Input from the network is untrusted: any failure of the decoder, including a Rust panic, comes
out as `OpusError` and the decoder is replaced by a fresh one, so one client's garbage never takes
anything else down.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 24000


class OpusError(ValueError):
    """Bytes that are not a valid Ogg/Opus stream (or not its continuation)."""


def _is_fatal(e: BaseException) -> bool:
    # pyo3 maps Rust panics to PanicException, a BaseException: catch those, not real exits.
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)) or type(e).__name__ == "CancelledError"


class OpusDecoder:
    """Ogg pages in, float32 mono PCM at 24 kHz out, as soon as whole Opus packets arrive."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        import sphn

        self._sphn = sphn
        self.sample_rate = sample_rate
        self._reader = sphn.OpusStreamReader(sample_rate)
        self.errors = 0

    def reset(self) -> None:
        self._reader = self._sphn.OpusStreamReader(self.sample_rate)

    def decode(self, ogg: bytes) -> np.ndarray:
        """Appends bytes of the Ogg stream; returns the PCM [N] decoded so far (N may be 0)."""
        try:
            pcm = self._reader.append_bytes(bytes(ogg))
        except BaseException as e:  # noqa: BLE001 - see _is_fatal
            if _is_fatal(e):
                raise
            self.errors += 1
            self.reset()  # a broken demuxer state would reject everything after it
            raise OpusError(f"bad Ogg/Opus data: {e}") from None
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            # A stereo stream would come interleaved or as [channels, N]: keep the first channel.
            pcm = pcm.reshape(pcm.shape[0], -1)[0] if pcm.ndim == 2 else pcm.reshape(-1)
        if not np.isfinite(pcm).all():
            raise OpusError("decoded audio holds NaN or infinite values")
        return pcm


class OpusEncoder:
    """float32 mono PCM at 24 kHz in, Ogg pages out (empty bytes until a page is complete)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        import sphn

        self._writer = sphn.OpusStreamWriter(sample_rate)

    def encode(self, pcm: np.ndarray) -> bytes:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        return bytes(self._writer.append_pcm(np.clip(pcm, -1.0, 1.0)))
