"""Streaming Ogg/Opus per conversation, and its behaviour on bad bytes."""

from __future__ import annotations

import numpy as np
import pytest

from openmoshi.serving.opus import OpusDecoder, OpusEncoder, OpusError

FRAME = 1920


def _tone(n):
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n * FRAME) / 24000)).astype(np.float32)


def _pages(pcm):
    enc = OpusEncoder()
    return [enc.encode(pcm[i:i + FRAME]) for i in range(0, len(pcm), FRAME)]


def test_round_trip_streaming():
    pcm = _tone(25)
    dec = OpusDecoder()
    out = np.concatenate([dec.decode(page) for page in _pages(pcm)])
    assert out.dtype == np.float32 and abs(len(out) - len(pcm)) <= 2 * FRAME
    # Opus is lossy and delays a little: compare energies, and correlation at the best lag.
    n = len(out)
    lags = [np.dot(out[k:n], pcm[:n - k]) / (np.linalg.norm(out[k:n]) * np.linalg.norm(pcm[:n - k]) + 1e-9)
            for k in range(0, 400)]
    assert max(lags) > 0.9


@pytest.mark.parametrize("garbage", [b"garbage!" * 10, b"OggS" + bytes(60), bytes(range(256))])
def test_garbage_is_an_error_and_the_decoder_recovers(garbage):
    dec = OpusDecoder()
    with pytest.raises(OpusError, match="Ogg"):
        dec.decode(garbage)
    assert dec.errors == 1
    pages = _pages(_tone(5))
    assert sum(dec.decode(page).shape[0] for page in pages) > 0  # a fresh stream decodes


def test_truncated_stream_is_buffered_then_continues():
    pages = b"".join(_pages(_tone(6)))
    dec = OpusDecoder()
    got = 0
    for i in range(0, len(pages), 37):  # pages split at arbitrary points
        got += dec.decode(pages[i:i + 37]).shape[0]
    assert got >= 4 * FRAME


def test_page_cut_in_the_middle_then_new_stream():
    pages = _pages(_tone(4))
    dec = OpusDecoder()
    dec.decode(pages[0])
    dec.decode(pages[1][: len(pages[1]) // 2])  # truncated page
    # The rest of the stream never comes; garbage follows instead: an error, not a crash.
    with pytest.raises(OpusError):
        for _ in range(3):
            dec.decode(b"not an ogg page at all, really not" * 3)
