"""The server's batch costs what its conversations need (issue 12): ticks run on the occupied
slots' prefix rounded up to a bucket, conversations move down into freed slots, and none of it
changes what a conversation hears: its frames depend on its input and seeds only."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from openmoshi.engine.engine import buckets
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.serving.loop import Frame, Join, Leave
from openmoshi.serving.server import MoshiServer, ServerConfig
from server_utils import tiny_models

SAMPLED = SamplingConfig(temp=0.8, top_k=20, temp_text=0.7, top_k_text=10)


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


class Driver:
    """The server's model loop stepped by hand (no thread, no clock), its seats opened as the server does."""

    def __init__(self, models, max_slots: int):
        lm, mimi, tok = models
        self.server = MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=max_slots, static_dir=None, cuda_graph=False),
                                  SAMPLED)
        self.loop = self.server.loop
        self.loop.sink = self._sink
        with torch.no_grad():
            self.loop.engine = self.loop.make_engine()
        self.slots, self.frames = {}, {}

    def _sink(self, events):
        for e in events:
            if isinstance(e, Frame):
                self.frames[self.server.seats.taken[e.seat]].append((e.pcm, e.text))

    def join(self, name, seeds, sampling=SAMPLED):
        self.frames[name] = []
        seat = self.slots[name] = self.server.seats.open(name)
        assert seat is not None
        self.loop.submit(Join(seat, sampling, seeds))

    def leave(self, name):
        seat = self.slots.pop(name)
        self.loop.submit(Leave(seat))
        self.server.seats.close(seat)

    def row(self, name) -> int:
        return self.loop._row_of(self.slots[name])

    def tick(self, inputs: dict):
        """inputs: name -> one frame of pcm for each conversation that speaks this tick."""
        with torch.no_grad():
            self.loop._apply_commands()
            for name, pcm in inputs.items():
                self.loop.push(self.slots[name], pcm[None])
            if any(r is not None for r in self.loop.rows):
                self.loop._tick()
            self.loop._flush()


def speech(seed: int, ticks: int, frame: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(frame)).astype(np.float32) for _ in range(ticks)]


def alone(models, pcm: list, seeds, sampling=SAMPLED) -> list:
    d = Driver(models, 1)
    d.join("x", seeds, sampling)
    for frame in pcm:
        d.tick({"x": frame})
    return d.frames["x"]


def assert_same(got: list, ref: list) -> None:
    assert len(got) == len(ref) > 5
    assert [t for _, t in got] == [t for _, t in ref]  # text pieces, exactly
    for (g, _), (r, _) in zip(got, ref):  # Mimi at another batch size: float rounding only
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(), SAMPLED], ids=["greedy", "seeded"])
def test_a_conversation_hears_the_same_alone_beside_others_and_moved(models, sampling):
    F, T = models[1].frame_size, 24
    x = speech(1, T, F)
    ref = alone(models, x, (11, 12), sampling)
    assert len({t for _, t in ref if t}) > 2  # it says things

    beside = Driver(models, 4)  # two others first: x takes slot 2
    beside.join("a", (1, 2))
    beside.join("b", (3, 4))
    beside.join("x", (11, 12), sampling)
    others = {"a": speech(2, T, F), "b": speech(3, T, F)}
    for t in range(T):
        beside.tick({"a": others["a"][t], "b": others["b"][t], "x": x[t]})
    assert beside.row("x") == 2
    assert_same(beside.frames["x"], ref)

    moved = Driver(models, 4)
    moved.join("a", (1, 2))
    moved.join("x", (11, 12), sampling)
    moved.join("b", (3, 4))
    for t in range(T):
        if t == 9:
            moved.leave("a")  # a hole at slot 0: b (slot 2, the highest) moves into it
        if t == 15:
            moved.leave("b")  # x (slot 1) is alone in slot 1 ... and moves to 0
        moved.tick({name: (x[t] if name == "x" else others[name][t]) for name in moved.slots})
    assert moved.row("x") == 0
    assert_same(moved.frames["x"], ref)


def test_seeds_make_conversations_reproducible_and_distinct(models):
    F = models[1].frame_size
    x = speech(4, 20, F)
    a, b, c = alone(models, x, (1, 2)), alone(models, x, (1, 2)), alone(models, x, (5, 6))
    assert [t for _, t in a] == [t for _, t in b]
    assert [t for _, t in a] != [t for _, t in c]


def test_buckets():
    assert buckets(1) == [1] and buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]


@settings(max_examples=12, stateful_step_count=24, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
class Occupancy(RuleBasedStateMachine):
    """Conversations join and leave in any order: the occupied slots stay a prefix, the tick
    computes the smallest bucket that holds them, and every conversation hears exactly what it
    would alone (no state is mixed up by the moves)."""

    MODELS = None

    def __init__(self):
        super().__init__()
        self.models = Occupancy.MODELS
        self.frame = self.models[1].frame_size
        self.d = Driver(self.models, 5)
        self.count = 0
        self.heard = {}  # name -> (seeds, frames pushed)
        self.done = []

    @precondition(lambda self: len(self.d.server.seats) < 5)
    @rule(seed=st.integers(0, 1000))
    def join(self, seed):
        name = f"c{self.count}"
        self.count += 1
        self.d.join(name, (seed, seed + 1))
        self.heard[name] = ((seed, seed + 1), [])

    @precondition(lambda self: self.d.slots)
    @rule(data=st.data())
    def leave(self, data):
        name = data.draw(st.sampled_from(sorted(self.d.slots)))
        self.d.leave(name)
        self.done.append(name)

    @rule(ticks=st.integers(1, 3))
    def tick(self, ticks):
        for _ in range(ticks):
            inputs = {}
            for name in self.d.slots:
                # A seed of its own for each conversation's n-th frame, the same in every run (hash()
                # of a str changes with PYTHONHASHSEED).
                frame = speech(zlib.crc32(f"{name}/{len(self.heard[name][1])}".encode()) % 10_000, 1, self.frame)[0]
                inputs[name] = frame
                self.heard[name][1].append(frame)
            self.d.tick(inputs)
            k = len(self.d.slots)
            if k:
                indices = [i for i, r in enumerate(self.d.loop.rows) if r is not None]
                assert indices == list(range(k))  # a prefix
                assert self.d.server.metrics.batch_rows == next(n for n in buckets(5) if n >= k)

    @invariant()
    def reserved_matches_slots(self):
        taken = set(self.d.server.seats.taken)
        joined = {r.seat for r in self.d.loop.rows if r is not None}
        assert taken == joined or not self.d.loop._commands.empty()

    def teardown(self):
        for name, (seeds, pcm) in self.heard.items():
            if len(pcm) > 1:
                ref = alone(self.models, pcm, seeds)
                got = self.d.frames[name]
                assert [t for _, t in got] == [t for _, t in ref], name
                for (g, _), (r, _) in zip(got, ref):
                    np.testing.assert_allclose(g, r, atol=1e-5)


def test_occupancy_state_machine(models):
    Occupancy.MODELS = models
    Occupancy.TestCase().runTest()


@pytest.mark.slow
def test_one_conversation_is_served_as_well_by_a_larger_server(models):
    """Through the running server: one conversation on a --max-sessions 4 server is computed on one
    row (its idle slots cost nothing) and hears what it hears on a --max-sessions 1 server: the same
    words, every frame answered (the input clock: nothing dropped or made up however loaded the
    machine). How fast each is: benchmarks/server_load.py."""
    import asyncio

    from chat_client import chat
    from server_utils import serving

    async def talk(max_sessions: int):
        async with serving(models, max_sessions=max_sessions, clock="input") as (server, url, _http):
            rows = set()

            async def watch():
                while True:
                    rows.add(server.metrics.batch_rows)
                    await asyncio.sleep(0.01)

            watching = asyncio.create_task(watch())
            result = await chat(url + "?text_seed=5&audio_seed=6", 3.0, drain=30, unanswered=1)
            watching.cancel()
            return result, rows - {0}

    (one, rows_one), (four, rows_four) = asyncio.run(talk(1)), asyncio.run(talk(4))
    assert rows_one == rows_four == {1}, (rows_one, rows_four)
    for r in (one, four):  # the official loop's first step answers nothing; every later frame is answered
        assert r.handshake and not r.errors and r.frames_received == r.frames_sent - 1, (r.frames_received,
                                                                                          r.frames_sent)
    # (Frames, not samples: how much of the Opus tail has come when the client stops reading varies.)
    assert one.texts and four.texts == one.texts


def test_state_size_is_known_before_allocating():
    """`state_bytes` is what `init_state` allocates (the server checks it against free memory)."""
    from lm_utils import CONFIGS, make_official_lm, ours_from_official
    from openmoshi.lm import generate as G

    def tensors(o):
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, list):
            for x in o:
                yield from tensors(x)
        elif hasattr(o, "__dataclass_fields__"):
            for f in o.__dataclass_fields__:
                yield from tensors(getattr(o, f))

    for name in ("tiny_7b", "golden", "tiny_2b_like", "tiny_stt"):
        kw = CONFIGS[name]
        lm = ours_from_official(make_official_lm(kw), kw)
        state = G.init_state(lm, 3, slot_streams=True)
        shared = {id(state.streams.initial), id(state.streams.delays)}
        assert G.state_bytes(lm, 3) == sum(t.numel() * t.element_size() for t in tensors(state) if id(t) not in shared)


def test_too_many_sessions_are_refused_at_start_with_the_numbers(models, monkeypatch):
    from openmoshi.engine import engine as E
    from openmoshi.lm import generate as G

    lm, mimi, tok = models
    per = G.state_bytes(lm, 1)
    monkeypatch.setattr(E, "available_bytes", lambda device: int(per * 10.5 / 0.9))
    MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=10, static_dir=None))  # fits
    with pytest.raises(ValueError, match=r"--max-sessions 64 needs .* free: use --max-sessions 10 or fewer"):
        MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=64, static_dir=None))
