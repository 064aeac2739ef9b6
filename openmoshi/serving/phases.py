"""Phase groups: which rows the model loop ticks, and when (issue 20).

Each conversation's frames arrive at a phase of its own within the 80 ms frame. One batch per frame
makes the early ones wait for the late ones (up to a frame); one tick per conversation costs a step
each. So the loop ticks the rows whose frames are in (a phase group) as soon as they are in, as long
as the model has room for it, and merges them into one batch when it has not:

    ready rows = {0, 2}, occupied = {0, 1, 2}
    room: every conversation ticked at a phase of its own fits in LOAD_LIMIT of a frame
        (occupied x the measured cost of a one-row tick)  -> tick {0} and {2} now, alone
    less room: g groups fit (g ticks of occupied / g rows, `Costs.groups`): the ready rows wait
        for the rows whose frames are due within 1/g of a frame after theirs, then tick together
        (g = 1: every row, one batch); never longer than those frames are expected (a frame after
        their last, plus JITTER_S) nor than a frame in all: a late client holds back nobody

At low load every conversation is ticked at its own phase; at full load they share one batch per
frame. No silence is ever made up for a late row: it is ticked when its frame comes, so what a
conversation hears is a function of its own input, whatever its neighbours' phases. Costs are
measured, never assumed (`Costs`: tick durations by number of rows), so the same rule fits a 2-core
CPU, where one tick of real-size Mimi takes most of a frame, and a GPU, where many fit.

The planning is a pure function of the times it is given (`plan`), tested with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FRAME_S = 0.08  # one frame of audio
LOAD_LIMIT = 0.8  # phase groups may keep the model busy this share of each frame; beyond, one batch
EMA = 0.2  # weight of the latest tick in a cost's moving average
JITTER_S = 0.02  # how late past its phase a frame is still waited for


def runs(rows: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of rows as (start, stop): [0, 1, 3] -> [(0, 2), (3, 4)]."""
    out: list[tuple[int, int]] = []
    for r in sorted(rows):
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


@dataclass
class Costs:
    """Measured tick durations: a moving average per number of rows."""

    ema: dict[int, float] = field(default_factory=dict)
    _groups: dict[int, int] = field(default_factory=dict, repr=False)  # `groups` per count, until the next record

    def record(self, rows: int, start: float, end: float) -> None:
        took = end - start
        self.ema[rows] = took if rows not in self.ema else (1 - EMA) * self.ema[rows] + EMA * took
        self._groups.clear()

    def predict(self, rows: int) -> float:
        """The expected duration of a tick of `rows` rows: measured; else interpolated between the
        nearest sizes measured around it, or that of the nearest larger one (a bound); 0 when
        nothing is known yet (the first ticks measure it)."""
        if rows in self.ema:
            return self.ema[rows]
        larger = [n for n in self.ema if n > rows]
        if not larger:
            return 0.0
        hi = min(larger)
        smaller = [n for n in self.ema if n < rows]
        if not smaller:
            return self.ema[hi]
        lo = max(smaller)
        return self.ema[lo] + (self.ema[hi] - self.ema[lo]) * (rows - lo) / (hi - lo)

    def groups(self, conversations: int) -> int:
        """How many phase groups of these conversations the model can tick in a frame: the most g
        with g ticks of ceil(conversations / g) rows within LOAD_LIMIT of a frame (1 at least)."""
        known = self._groups.get(conversations)  # the loop asks at every frame's arrival, costs change per tick
        if known is None:
            fits = [g for g in range(1, conversations + 1)
                    if g * self.predict(-(-conversations // g)) <= LOAD_LIMIT * FRAME_S]
            known = self._groups[conversations] = max(fits, default=1)
        return known


@dataclass(frozen=True)
class Plan:
    spans: list[tuple[int, int]] | None  # rows to tick now, as (start, stop) runs; None: wait
    wake: float | None = None  # when waiting: the time to look again (None: at the next frame or command)
    merged: bool = False  # every occupied row is in: one batch


def plan(occupied: list[int], ready: list[int], oldest: float | None, now: float, costs: Costs,
         expected: dict[int, float] | None = None) -> Plan:
    """Which rows to tick at `now` (see the module doc). `ready`: occupied rows with a frame in (or
    in their prompt phase); `oldest`: arrival time of the oldest frame among them (None: only
    prompt rows, which never wait a frame for company); `expected`: when the next frame of each
    other row is due (a frame after its last one; rows that never sent are not waited for)."""
    if not ready:
        return Plan(None)
    spans = runs(ready)
    if set(ready) >= set(occupied):
        return Plan(spans, merged=True)
    groups = costs.groups(len(occupied))
    if groups >= len(occupied):  # room for every conversation at a phase of its own
        return Plan(spans)
    start = now if oldest is None else oldest
    deadline = start + FRAME_S
    window = FRAME_S / groups  # a group: the rows whose frames come within this of the oldest one
    due = [t + JITTER_S for i, t in (expected or {}).items() if i not in ready and t <= start + window]
    deadline = min(deadline, max(due)) if due else now
    if now >= deadline:
        return Plan(spans)
    return Plan(None, wake=deadline)
