"""Acoustic echo cancellation for the live client: with loudspeakers instead of headphones the
microphone hears Moshi's own voice, and Moshi would answer itself.

The canceller is WebRTC's (AEC3: an adaptive linear filter, a delay estimator and a residual echo
suppressor), the audio processing module that the `livekit` package ships compiled. It takes 10 ms
frames at our 24 kHz directly and resamples inside to its own processing rates, so no resampling
happens here. It adds about 9 ms of latency to the microphone.

The reference has to be what reached the speaker, lined up with the microphone. A full-duplex sound
card callback hands over a captured block and takes a block to play; the block to play sounds
later than the captured one was recorded, by the card's round trip D (output plus input latency):

    callback k:       indata captured at t_adc          outdata played at t_dac = t_adc + D
    microphone:  ... | k-2 | k-1 |  k  |
    speaker:     ... | k-2 | k-1 |  k  |      (the same blocks, D later)
    => microphone sample c hears speaker sample c - D (plus the room's path, which AEC3 learns)

`EchoPath` is that: a queue of the played audio that starts with D zeros. AEC3's own delay estimator
then only has to find the acoustic path, not the sound card's buffering.
"""

from __future__ import annotations

import numpy as np

from openmoshi.serving.opus import SAMPLE_RATE

FRAME_10MS = SAMPLE_RATE // 100  # the canceller's frame: 240 samples
INSTALL_HINT = ("echo cancellation needs the 'livekit' package (WebRTC's echo canceller): "
                "pip install 'livekit>=1.0.12'; or pass --no-aec (fine with headphones)")


class AecUnavailable(RuntimeError):
    """The echo canceller's package is missing; the message says how to install it."""


class EchoPath:
    """What the speaker played, delayed by the sound card's round trip (`delay` samples) so that the
    reference it hands out lines up sample for sample with the microphone."""

    def __init__(self, delay: int):
        if delay < 0:
            raise ValueError(f"the round trip cannot be negative, got {delay} samples")
        self.queue = np.zeros(delay, np.float32)

    def step(self, played: np.ndarray, captured: int) -> np.ndarray:
        """`played` went to the speaker in the same callback that delivered `captured` microphone
        samples; returns the reference for those samples, float32 [captured]."""
        self.queue = np.concatenate([self.queue, np.asarray(played, np.float32)])
        reference, self.queue = self.queue[:captured], self.queue[captured:]
        if len(reference) < captured:  # more captured than ever played (a round trip under a block)
            reference = np.concatenate([np.zeros(captured - len(reference), np.float32), reference])
        return reference


def round_trip_samples(input_adc_time: float, output_dac_time: float, fallback_s: float) -> int:
    """D of the diagram from one duplex callback's timestamps (seconds on the stream's clock); the
    stream's reported latencies (`fallback_s`, input plus output) when the host API gives no times."""
    d = output_dac_time - input_adc_time
    if not 0.0 < d < 2.0:  # some host APIs report zeros
        d = fallback_s
    return max(0, round(d * SAMPLE_RATE))


def _livekit_rtc():
    try:
        from livekit import rtc
    except ImportError:
        raise AecUnavailable(INSTALL_HINT) from None
    if not hasattr(rtc, "AudioProcessingModule") or not hasattr(rtc.AudioProcessingModule, "set_stream_delay_ms"):
        raise AecUnavailable(INSTALL_HINT + " (the installed livekit is too old)")
    return rtc


def _to_int16(x: np.ndarray) -> bytearray:
    return bytearray((np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes())


class EchoCanceller:
    """Removes the echo of `reference` (what the speaker played, aligned by `EchoPath`) from the
    microphone: `clean = canceller.process(mic, reference)`, float32 at 24 kHz, a multiple of 10 ms.
    Keeps its adaptive state between calls: one canceller per conversation."""

    def __init__(self):
        self.rtc = _livekit_rtc()
        # Echo cancellation only: noise suppression and gain control would reshape the user's voice
        # before Moshi's codec, which was trained on plain microphones.
        self.apm = self.rtc.AudioProcessingModule(echo_cancellation=True)

    def process(self, mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
        mic = np.asarray(mic, np.float32).reshape(-1)
        reference = np.asarray(reference, np.float32).reshape(-1)
        if len(mic) != len(reference) or len(mic) % FRAME_10MS:
            raise ValueError(f"mic and reference must have the same length, a multiple of {FRAME_10MS} "
                             f"samples; got {len(mic)} and {len(reference)}")
        out = np.empty_like(mic)
        for i in range(0, len(mic), FRAME_10MS):
            far = self.rtc.AudioFrame(_to_int16(reference[i : i + FRAME_10MS]), SAMPLE_RATE, 1, FRAME_10MS)
            self.apm.process_reverse_stream(far)
            self.apm.set_stream_delay_ms(0)  # the reference is already aligned by EchoPath
            near = self.rtc.AudioFrame(_to_int16(mic[i : i + FRAME_10MS]), SAMPLE_RATE, 1, FRAME_10MS)
            self.apm.process_stream(near)  # in place
            out[i : i + FRAME_10MS] = np.frombuffer(near.data, "<i2") / 32768.0
        return out
