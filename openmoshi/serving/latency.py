"""Latency as a client hears it: for each chunk of audio that comes back, its arrival time minus the
time the client had sent the input the model needed for it.

    meter = LatencyMeter()
    meter.sent(samples_given_to_the_encoder, time.monotonic())      # at each audio message sent
    meter.received(samples_decoded_so_far, time.monotonic())        # at each audio message received
    meter.summary()   # {"p50_ms", "p90_ms", "first_third_p90_ms", "last_third_p90_ms", "chunks"}

The output up to sample S needs the input up to sample S plus one frame: the first step of the
official loop reads only initial tokens, so a server's output runs one frame behind its input (the
acoustic delay is in the model, and counts). A server that keeps real time shows a flat latency; one
that falls behind shows a growing one, which the last third's p90 against the first third's
shows. The same formula for every server, ours and the official one (see benchmarks/latency.py).
"""

from __future__ import annotations

import bisect

import numpy as np

FRAME_SIZE = 1920  # samples of one 80 ms frame at 24 kHz


class LatencyMeter:
    def __init__(self, frame_size: int = FRAME_SIZE):
        self.frame_size = frame_size
        self._sent_samples: list[int] = []  # cumulative input samples, increasing
        self._sent_times: list[float] = []
        self._received: list[tuple[int, float]] = []  # (cumulative output samples, arrival time)

    def sent(self, total_samples: int, at: float) -> None:
        """The client has sent `total_samples` of input in all, as of time `at`."""
        if not self._sent_samples or total_samples > self._sent_samples[-1]:
            self._sent_samples.append(total_samples)
            self._sent_times.append(at)

    def received(self, total_samples: int, at: float) -> None:
        """`total_samples` of output have arrived in all, as of time `at`."""
        self._received.append((total_samples, at))

    def latencies(self) -> np.ndarray:
        """Seconds, one per received chunk whose needed input was sent (in arrival order)."""
        out = []
        for total, at in self._received:
            i = bisect.bisect_left(self._sent_samples, total + self.frame_size)
            if i < len(self._sent_times):
                out.append(at - self._sent_times[i])
        return np.asarray(out, dtype=np.float64)

    def summary(self) -> dict:
        lat = self.latencies() * 1000.0
        if lat.size == 0:
            return {"chunks": 0}
        third = max(1, lat.size // 3)

        def p(x, q):
            return round(float(np.percentile(x, q)), 1)

        return {"chunks": int(lat.size), "p50_ms": p(lat, 50), "p90_ms": p(lat, 90),
                "first_third_p90_ms": p(lat[:third], 90), "last_third_p90_ms": p(lat[-third:], 90)}
