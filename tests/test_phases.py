"""Phase groups (issue 20): the realtime clock ticks the rows whose frames are in as soon as they are
in while the model has room, and merges them into one batch when it has not; what each conversation
hears equals its solo run either way. The planning with a fake clock, then the model loop itself
on a fake clock whose ticks cost what the test says."""

import numpy as np
import pytest
import torch

import openmoshi.serving.loop as loop_module
from openmoshi.serving.phases import FRAME_S, JITTER_S, LOAD_LIMIT, Costs, plan, runs

from test_occupancy import SAMPLED, Driver, alone, assert_same, speech
from server_utils import tiny_models


def test_runs():
    assert runs([]) == []
    assert runs([3, 0, 1]) == [(0, 2), (3, 4)]
    assert runs([2, 3, 4]) == [(2, 5)]


def test_costs_are_measured_per_size_and_bound_by_larger_sizes():
    costs = Costs()
    assert costs.predict(1) == 0.0  # nothing known: the first ticks measure
    costs.record(4, 0.0, 0.05)
    assert costs.predict(1) == pytest.approx(0.05)  # the nearest larger size bounds it
    costs.record(1, 0.1, 0.12)
    assert costs.predict(1) == pytest.approx(0.02)
    costs.record(1, 0.2, 0.25)  # a moving average, not the last value
    assert 0.02 < costs.predict(1) < 0.05
    costs = Costs({1: 0.02, 4: 0.05})
    assert costs.predict(2) == pytest.approx(0.03)  # between measured sizes: interpolated


def test_as_many_groups_as_fit_in_a_frame():
    costs = Costs({1: 0.02, 2: 0.03, 4: 0.05})
    assert costs.groups(3) == 3  # 3 x 20 ms <= 64 ms: each conversation alone
    assert costs.groups(4) == 2  # 4 x 20 > 64; 2 x 30 fits: two groups of two
    assert Costs({1: 0.05, 2: 0.07}).groups(2) == 1  # one batch
    assert Costs().groups(8) == 8  # nothing measured yet


def test_two_groups_of_two_wait_for_their_partner_only():
    costs = Costs({1: 0.02, 2: 0.03, 4: 0.05})
    expected = {1: 0.515, 2: 0.545, 3: 0.565}  # phases 0, 15, 45, 65 ms
    p = plan(occupied=[0, 1, 2, 3], ready=[0], oldest=0.5, now=0.5, costs=costs, expected=expected)
    assert p.spans is None and p.wake == pytest.approx(0.515 + JITTER_S)  # row 1 only (due within 40 ms)


def test_a_group_is_ticked_at_once_while_there_is_room():
    costs = Costs()
    costs.record(1, 0.0, 0.02)  # three conversations at three phases: 60 ms of a frame's 80
    p = plan(occupied=[0, 1, 2], ready=[2], oldest=0.5, now=0.5, costs=costs, expected={0: 0.51, 1: 0.52})
    assert p.spans == [(2, 3)] and not p.merged
    # a fourth would not fit (80 ms): then the ready rows wait for the others' frames
    p = plan(occupied=[0, 1, 2, 3], ready=[2], oldest=0.5, now=0.5, costs=costs, expected={0: 0.51, 1: 0.52})
    assert p.spans is None


def test_without_room_the_ready_rows_wait_for_the_others_then_share_one_batch():
    costs = Costs()
    costs.record(1, 0.40, 0.40 + LOAD_LIMIT * FRAME_S)  # the model was busy most of the last frame
    p = plan(occupied=[0, 1], ready=[0], oldest=0.47, now=0.47, costs=costs, expected={1: 0.49})
    assert p.spans is None and p.wake == pytest.approx(0.49 + JITTER_S)  # wait for row 1's frame, due soon
    p = plan(occupied=[0, 1], ready=[0, 1], oldest=0.47, now=0.49, costs=costs, expected={1: 0.49})
    assert p.spans == [(0, 2)] and p.merged  # every frame in: one batch
    # a late client never holds back the others: past its due time, the ready rows go alone
    p = plan(occupied=[0, 1], ready=[0], oldest=0.47, now=0.49 + JITTER_S, costs=costs, expected={1: 0.49})
    assert p.spans == [(0, 1)]
    # nor for a frame due later than a frame after the oldest ready one
    p = plan(occupied=[0, 1], ready=[0], oldest=0.47, now=0.47, costs=costs, expected={1: 0.60})
    assert p.spans == [(0, 1)]
    # a row that never sent is not waited for
    assert plan(occupied=[0, 1], ready=[0], oldest=0.47, now=0.47, costs=costs).spans == [(0, 1)]


def test_prompt_rows_alone_never_wait_for_a_frame():
    costs = Costs()
    costs.record(1, 0.0, 0.079)
    p = plan(occupied=[0, 1], ready=[1], oldest=None, now=0.08, costs=costs, expected={0: 0.12})
    assert p.spans is None and p.wake == pytest.approx(0.12 + JITTER_S)  # no room: until row 0's frame
    assert plan(occupied=[0], ready=[0], oldest=None, now=0.08, costs=costs).spans == [(0, 1)]


# ----------------------------------------------------------------------------- the loop on a fake clock


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


def simulate(models, monkeypatch, arrivals: dict[str, list[float]], pcm: dict[str, list], cost: float):
    """Runs the realtime model loop by hand on a fake clock: conversation `name`'s frame i arrives at
    arrivals[name][i]; every tick takes `cost` seconds. Returns the driver and the ticks as
    (time, rows)."""
    clock = FakeTime()
    monkeypatch.setattr(loop_module, "time", clock)
    d = Driver(models, 4)
    for k, name in enumerate(arrivals):
        d.join(name, (11 + k, 12 + k))
    loop = d.loop
    wake = []
    loop._sleep = lambda seconds: wake.append(clock.now + max(0.0, seconds))
    ticks, tick_rows = [], loop._tick_rows

    def costly(start, n, rows):
        ticks.append((clock.now, tuple(rows)))
        tick_rows(start, n, rows)
        clock.now += cost

    loop._tick_rows = costly
    events = sorted((t, name, i) for name, times in arrivals.items() for i, t in enumerate(times))
    with torch.no_grad():
        loop._apply_commands()
        loop._flush()
        while True:
            while events and events[0][0] <= clock.now + 1e-9:
                _, name, i = events.pop(0)
                loop.push(d.slots[name], pcm[name][i][None])
            if not events and not any(seat.inbox for seat in d.slots.values()):
                break
            spans = loop._plan()
            if spans is loop_module.WAIT:
                later = [t for t in (events[0][0] if events else None, wake[-1] if wake else None) if t is not None]
                wake.clear()
                clock.now = max(clock.now, min(later))
                continue
            loop._tick(spans)
            loop._flush()
    return d, ticks


def test_phase_groups_on_the_loop_alone_while_there_is_room_and_merged_when_not(models, monkeypatch):
    F, T = models[1].frame_size, 16
    pcm = {"a": speech(1, T, F), "b": speech(2, T, F)}
    arrivals = {"a": [i * FRAME_S for i in range(T)], "b": [i * FRAME_S + 0.04 for i in range(T)]}
    solo = {"a": alone(models, pcm["a"], (11, 12)), "b": alone(models, pcm["b"], (12, 13))}

    # Room (a tick takes 10 ms): each conversation is ticked alone, the moment its frame is in.
    d, ticks = simulate(models, monkeypatch, arrivals, pcm, cost=0.01)
    assert all(len(rows) == 1 for _, rows in ticks) and len(ticks) == 2 * T
    started = sorted(arrivals["a"] + arrivals["b"])
    assert [t for t, _ in ticks] == pytest.approx(started)  # no waiting for the other phase
    for name in pcm:
        assert_same(d.frames[name], solo[name])

    # No room (a tick takes 70 ms): after the first ticks measure it, one batch a frame.
    d, ticks = simulate(models, monkeypatch, arrivals, pcm, cost=0.07)
    merged = [rows for _, rows in ticks[3:]]
    assert merged and all(rows == (0, 1) for rows in merged[:-1])
    assert sum(len(rows) for _, rows in ticks) == 2 * T  # every frame ticked once, none made up
    for name in pcm:
        assert_same(d.frames[name], solo[name])


def test_a_late_client_holds_back_nobody_and_gets_no_made_up_silence(models, monkeypatch):
    """b stops sending for 5 frames then resumes: a goes on at its own pace; b's frames are all
    heard, in order, with nothing inserted (its output equals its solo run)."""
    F, T = models[1].frame_size, 14
    pcm = {"a": speech(3, T, F), "b": speech(4, T, F)}
    late = [i * FRAME_S + 0.02 + (0.4 if i >= 4 else 0.0) for i in range(T)]
    arrivals = {"a": [i * FRAME_S for i in range(T)], "b": late}
    d, ticks = simulate(models, monkeypatch, arrivals, pcm, cost=0.07)
    a_ticks = [t for t, rows in ticks if 0 in rows]
    assert max(np.diff(a_ticks)) <= FRAME_S + JITTER_S + 1e-9  # a waited for b no longer than b was due
    for name, seeds in (("a", (11, 12)), ("b", (12, 13))):
        assert_same(d.frames[name], alone(models, pcm[name], seeds))


def test_a_machine_behind_real_time_says_so_once_and_keeps_a_bounded_backlog(models, caplog):
    d = Driver(models, 2)
    d.join("a", (1, 2))
    d.loop._apply_commands()
    frame = np.zeros((1, models[1].frame_size), np.float32)
    for _ in range(loop_module.INBOX_FRAMES + 4):  # input comes faster than the model takes it
        d.loop.push(d.slots["a"], frame)
        d.loop._check_pace()
    assert len(d.slots["a"].inbox) == loop_module.INBOX_FRAMES  # the oldest were dropped
    assert d.loop.metrics.get("openmoshi_frames_dropped_total", direction="in") == 4
    said = [r for r in caplog.records if r.getMessage() == "model_behind_real_time"]
    assert len(said) == 1 and d.loop.metrics.get("openmoshi_behind_real_time_total") == 1
    assert said[0].fields["backlog_frames"] >= loop_module.BEHIND_FRAMES and "--max-sessions" in said[0].fields["action"]
    d.slots["a"].inbox.clear()  # caught up: the next episode is said again
    d.loop._check_pace()
    d.loop.push(d.slots["a"], np.repeat(frame, loop_module.BEHIND_FRAMES, axis=0))
    d.loop._check_pace()
    assert d.loop.metrics.get("openmoshi_behind_real_time_total") == 2
