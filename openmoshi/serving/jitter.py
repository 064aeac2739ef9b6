"""The speaker's jitter buffer: hold back only as much of the server's voice as the network's jitter needs.

The server's audio comes in bursts (one 80 ms frame per model step) at uneven times, and the speaker
takes it at a steady rate. Each sample waits in the queue from its arrival until it plays: that
wait adds to the latency the user hears, so it should be no longer than what rides out a late burst.
The policy (the web UI's `web/jitter.js` is the same, line for line; tests/test_jitter.py checks
that both agree):

- Hold: at the start and after an underrun, new audio waits `target` before it plays, so that the
  next burst may come up to `target` late without a gap.
- Adapt: each underrun (the queue ran dry while playing: a burst was later than `target`) raises
  `target` by 20 ms, up to `ceiling` (the cap less one frame); every 5 s without an underrun lowers it
  by 10 ms, down to `least` (the user's setting, also where it starts).
- Trim: every 2 s, when the queue never fell below `target` + 10 ms while playing, the surplus is
  dropped (with a 2.5 ms crossfade), so a lowered target lowers the latency too, and the backlog of
  a burst that follows a stall does not stay.
- Cap: more than `most` queued (the network or the server ran far ahead of the speaker) drops the
  oldest audio down to `target` plus one frame at once.

Times are counted in samples of the speaker's clock (`clock`: samples pulled so far), so the policy
is the same whatever the sound card's block size, and a test can run it without a clock.
"""

from __future__ import annotations

from collections import deque

import numpy as np

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples of one 80 ms model step: the size of the server's bursts
STEP_UP_S = 0.020  # target raised by this at each underrun
STEP_DOWN_S = 0.010  # ... and lowered by this after each QUIET_S without one
QUIET_S = 5.0
TRIM_EVERY_S = 2.0  # how often a surplus in the queue is looked for
TRIM_MIN_S = 0.010  # a surplus smaller than this is left alone (a skip costs more than it saves)
FADE_S = 0.0025  # crossfade over a drop, so that it does not click


def _samples(seconds: float, rate: int) -> int:
    return int(round(seconds * rate))


class JitterBuffer:
    """Push the server's audio as it arrives, pull the speaker's blocks; see the module's policy.

    `least_s`: the least (and first) hold, `most_s`: the most audio queued before the oldest is dropped
    (at least `least_s` + one frame). `started` collects, for each pushed chunk with a `tag`, the pair
    (tag, samples its last sample waited in the queue), for the latency as heard."""

    def __init__(self, least_s: float = 0.02, most_s: float = 0.32, rate: int = SAMPLE_RATE):
        self.rate = rate
        self.least = max(0, _samples(least_s, rate))
        self.most = max(_samples(most_s, rate), self.least + FRAME_SIZE)
        self.ceiling = self.most - FRAME_SIZE  # a target above it would be dropped by the cap
        self.target = self.least
        self.step_up, self.step_down = _samples(STEP_UP_S, rate), _samples(STEP_DOWN_S, rate)
        self.quiet, self.trim_every = _samples(QUIET_S, rate), _samples(TRIM_EVERY_S, rate)
        self.trim_min, self.fade = _samples(TRIM_MIN_S, rate), _samples(FADE_S, rate)
        self.buffer = np.zeros(0, np.float32)
        self.clock = 0  # samples pulled so far: the speaker's clock
        self.pushed = 0  # samples pushed so far: the stream index after the newest sample
        self.playing = False
        self.held_since: int | None = None  # clock when audio came while not playing
        self.last_change = 0  # clock of the last underrun or target decrease
        self.window_start = 0
        self.low: int | None = None  # least queued in this trim window while playing
        self.marks: deque[tuple[int, object, int]] = deque()  # (index of a chunk's last sample, tag, arrival clock)
        self.started: list[tuple[object, int]] = []
        self.played = self.dropped = self.underruns = 0

    @property
    def queued(self) -> int:
        return len(self.buffer)

    def push(self, pcm: np.ndarray, tag: object = None) -> None:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if not len(pcm):
            return
        self.pushed += len(pcm)
        if tag is not None:
            self.marks.append((self.pushed - 1, tag, self.clock))
        self.buffer = np.concatenate([self.buffer, pcm])
        if not self.playing and self.held_since is None:
            self.held_since = self.clock
        if len(self.buffer) > self.most:
            self._drop(len(self.buffer) - (self.target + FRAME_SIZE))

    def pull(self, n: int) -> np.ndarray:
        """The next `n` samples for the speaker (silence where there is nothing to play)."""
        out = np.zeros(n, np.float32)
        begin = 0  # where in this block the audio starts
        if not self.playing and self.held_since is not None and self.clock + n > self.held_since + self.target:
            begin = max(0, self.held_since + self.target - self.clock)
            self.playing, self.held_since = True, None
        if self.playing:
            k = min(n - begin, len(self.buffer))
            out[begin : begin + k] = self.buffer[:k]
            self._mark_played(k, self.clock + begin)
            self.buffer = self.buffer[k:]
            self.played += k
            if k < n - begin:  # ran dry: the burst came later than target
                self.playing = False
                self.underruns += 1
                self.target = min(self.ceiling, self.target + self.step_up)
                self.last_change = self.clock
                self.low = 0  # no trimming in a window that had an underrun
            else:
                self.low = len(self.buffer) if self.low is None else min(self.low, len(self.buffer))
        self.clock += n
        self._adapt()
        return out

    def _adapt(self) -> None:
        if self.clock - self.last_change >= self.quiet:
            self.target = max(self.least, self.target - self.step_down)
            self.last_change = self.clock
        if self.clock - self.window_start >= self.trim_every:
            if self.playing and self.low is not None and self.low - self.target >= self.trim_min:
                self._drop(self.low - self.target)
            self.window_start, self.low = self.clock, None

    def _mark_played(self, k: int, at: int) -> None:
        """Chunks whose last sample is among the next `k` to play, the first of which plays at clock `at`."""
        head = self.pushed - len(self.buffer)  # stream index of buffer[0]
        while self.marks and self.marks[0][0] < head + k:
            index, tag, arrival = self.marks.popleft()
            self.started.append((tag, at + index - head - arrival))

    def _drop(self, n: int) -> None:
        """Drops the oldest `n` samples; while playing, the next samples fade from the dropped into the kept."""
        n = min(max(0, n), len(self.buffer))
        if not n:
            return
        if self.playing and len(self.buffer) >= n + self.fade:
            w = (np.arange(1, self.fade + 1, dtype=np.float32) / (self.fade + 1))
            mixed = self.buffer[: self.fade] * (1 - w) + self.buffer[n : n + self.fade] * w
            self.buffer = self.buffer[n:].copy()
            self.buffer[: self.fade] = mixed
        else:
            self.buffer = self.buffer[n:]
        self.dropped += n
        head = self.pushed - len(self.buffer)
        while self.marks and self.marks[0][0] < head:  # their last sample will never play
            self.marks.popleft()

    def take_started(self) -> list[tuple[object, int]]:
        out, self.started = self.started, []
        return out
