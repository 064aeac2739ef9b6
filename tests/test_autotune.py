"""CPU speed paths chosen by measurement (issue 20): the fastest candidate whose codes equal the
reference's, cached per machine and Mimi, and `openmoshi bench` saying what it chose."""

from __future__ import annotations

import json
import time

import pytest
import torch

from openmoshi.engine import autotune as A
from openmoshi.engine.speed import SpeedConfig, prepare

from server_utils import tiny_models


@pytest.fixture(scope="module")
def mimi():
    return tiny_models(seed=2)[1]


class Slow:
    """A Mimi that takes `delay` seconds more per encode step (or gives other codes)."""

    def __init__(self, mimi, delay: float = 0.0, shift: int = 0):
        self.mimi, self.delay, self.shift = mimi, delay, shift

    def __getattr__(self, name):
        return getattr(self.mimi, name)

    def encode_step(self, pcm, state):
        time.sleep(self.delay)
        return (self.mimi.encode_step(pcm, state) + self.shift) % self.mimi.cardinality


def test_a_deliberately_slow_path_loses(mimi, tmp_path):
    made = []

    def make(m, *modes):
        made.append(modes)
        return Slow(m, delay=0.05)

    choice = A.choose_mimi_fast(mimi, {"off": None, "slow": ("x", "y")}, make, tmp_path / "c.json")
    assert choice.modes is None and made == [("x", "y")]
    assert choice.times_ms["slow"] > choice.times_ms["off"] and not choice.cached


def test_a_faster_path_wins_and_the_choice_is_cached_and_reused(mimi, tmp_path):
    made = []

    def make(m, *modes):
        made.append(modes)
        return m.mimi  # the plain model: faster than the slowed reference, the same codes

    slowed = Slow(mimi, delay=0.05)
    cache = tmp_path / "c.json"
    first = A.choose_mimi_fast(slowed, {"off": None, "quick": ("a", "b")}, make, cache)
    assert first.modes == ("a", "b") and not first.cached and len(made) == 1
    again = A.choose_mimi_fast(slowed, {"off": None, "quick": ("a", "b")}, make, cache)
    assert again.modes == ("a", "b") and again.cached and len(made) == 1  # nothing built or measured
    stored = json.loads(cache.read_text())
    assert [v["mode"] for v in stored.values()] == ["quick"] and A.machine_key() in next(iter(stored))


def test_a_faster_path_with_other_codes_is_rejected(mimi, tmp_path):
    choice = A.choose_mimi_fast(Slow(mimi, delay=0.02), {"off": None, "wrong": ("a", "b")},
                                lambda m, *modes: Slow(m.mimi, shift=1), tmp_path / "c.json")
    assert choice.modes is None


def test_the_real_candidates_give_the_reference_codes(mimi, tmp_path):
    from openmoshi.accel.mimi_cpu import fast_cpu

    models = {"off": mimi, "fp32,fp32": fast_cpu(mimi, "fp32", "fp32")}
    _, codes = A.measure(models)
    assert torch.equal(codes["off"], codes["fp32,fp32"]) and len(set(codes["off"].flatten().tolist())) > 3
    choice = A.choose_mimi_fast(mimi, cache=tmp_path / "c.json")
    assert set(choice.times_ms) == {"off", "fp32,fp32"} and choice.name in choice.times_ms


def test_prepare_applies_what_auto_chose(mimi, tmp_path, monkeypatch):
    monkeypatch.setenv(A.CACHE_ENV, str(tmp_path))
    _, chosen, speed = prepare(None, mimi, torch.device("cpu"), SpeedConfig())
    assert speed.mimi_choice is not None and speed.mimi_fast == speed.mimi_choice.modes
    assert (chosen is mimi) == (speed.mimi_fast is None)
    assert "measured" in speed.describe() and (tmp_path / "autotune.json").exists()
    _, _, again = prepare(None, mimi, torch.device("cpu"), SpeedConfig())
    assert again.mimi_choice.cached and again.mimi_fast == speed.mimi_fast


def test_bench_prints_the_choice_and_both_times(tmp_path, monkeypatch, capsys):
    from openmoshi.cli.main import main

    monkeypatch.setenv(A.CACHE_ENV, str(tmp_path))
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--codec-only", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mimi fast path" in text and "off " in text and "fp32,fp32 " in text
    data = json.loads(out.read_text())
    assert set(data["mimi_times_ms"]) == {"off", "fp32,fp32"}
