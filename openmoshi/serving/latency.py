"""Latency as a client hears it: for each chunk of audio that comes back, its arrival time minus the
time the client had sent the input the model needed for it.

    meter = LatencyMeter()
    meter.sent(samples_given_to_the_encoder, time.monotonic())      # at each audio message sent
    meter.received(samples_decoded_so_far, time.monotonic())        # at each audio message received
    meter.summary()   # {"p50_ms", "p90_ms", "first_third_p90_ms", "last_third_p90_ms", "chunks"}
    meter.recent(10.0, time.monotonic())   # {"p50_ms", "p90_ms", "chunks"} of the last 10 s, while live

The output up to sample S needs the input up to sample S plus one frame: the first step of the
official loop reads only initial tokens, so a server's output runs one frame behind its input (the
acoustic delay is in the model, and counts). A server that keeps real time shows a flat latency; one
that falls behind shows a growing one, which the last third's p90 against the first third's
shows. The same formula for every server, ours and the official one (see benchmarks/latency.py),
and in the web UI (`web/latency.js`).
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

    def received(self, total_samples: int, at: float) -> float | None:
        """`total_samples` of output have arrived in all, as of time `at`. Returns this chunk's latency
        in seconds, or None while the input it needed is not sent yet (it counts once it is)."""
        self._received.append((total_samples, at))
        return self._latency(total_samples, at)

    def _latency(self, total: int, at: float) -> float | None:
        i = bisect.bisect_left(self._sent_samples, total + self.frame_size)
        return at - self._sent_times[i] if i < len(self._sent_times) else None

    def latencies(self) -> np.ndarray:
        """Seconds, one per received chunk whose needed input was sent (in arrival order)."""
        out = [self._latency(total, at) for total, at in self._received]
        return np.asarray([x for x in out if x is not None], dtype=np.float64)

    def recent(self, seconds: float, now: float) -> dict:
        """p50 and p90 of the chunks that arrived in the last `seconds` before `now`: the live view."""
        out = []
        for total, at in reversed(self._received):  # newest first: a long conversation costs no more
            if at < now - seconds:
                break
            lat = self._latency(total, at)
            if lat is not None:
                out.append(lat)
        if not out:
            return {"chunks": 0}
        lat = np.asarray(out) * 1000.0
        return {"chunks": len(out), "p50_ms": _percentile(lat, 50), "p90_ms": _percentile(lat, 90)}

    def summary(self) -> dict:
        lat = self.latencies() * 1000.0
        if lat.size == 0:
            return {"chunks": 0}
        third = max(1, lat.size // 3)
        p = _percentile
        return {"chunks": int(lat.size), "p50_ms": p(lat, 50), "p90_ms": p(lat, 90),
                "first_third_p90_ms": p(lat[:third], 90), "last_third_p90_ms": p(lat[-third:], 90)}


def _percentile(x, q: float) -> float:
    return round(float(np.percentile(x, q)), 1)
