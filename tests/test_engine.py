"""The streaming engine (issue 19): one engine under serve, infer and bench, its buckets, and the
registry of speed paths that decides what runs on a device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmoshi.engine import speed as S
from openmoshi.engine.engine import Engine, buckets, conditions
from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig

from server_utils import tiny_models


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=5)


def test_a_bucket_step_is_the_step_of_that_many_slots_alone(models):
    """Steps on bucket n run slots [0, n) of the full state in place, and give what a state of n
    slots gives; the slots beyond are untouched."""
    lm, mimi, _ = models
    greedy = SamplingConfig.greedy()
    engine = Engine(lm, mimi, 4, S.Speed(torch.device("cpu")), greedy)
    alone = G.init_state(lm, 2, greedy, slot_streams=True)
    rng = np.random.default_rng(0)
    before = engine.gen.temporal.keys[0][2:].clone()
    for t in range(6):
        pcm = torch.from_numpy((0.1 * rng.standard_normal((2, 1, 1920))).astype(np.float32))
        codes = engine.encode(pcm)[:, :, 0]
        out = engine.step(codes, position=t)
        ref = G.step(lm, alone, codes)
        assert torch.equal(out.text, ref.text) and torch.equal(out.audio, ref.audio)
    assert torch.equal(engine.gen.temporal.keys[0][2:], before)
    with pytest.raises(ValueError, match="not within"):
        engine.step(torch.zeros(3, 8, dtype=torch.long), start=2)


def test_a_span_of_slots_steps_them_alone_and_leaves_the_others(models):
    """A phase group's span [a, b): Mimi and LM steps on those slots of the full state give what a
    state of b - a slots gives (codes and tokens exactly), and every other slot is untouched."""
    lm, mimi, _ = models
    greedy = SamplingConfig.greedy()
    engine = Engine(lm, mimi, 4, S.Speed(torch.device("cpu")), greedy)
    alone = Engine(lm, mimi, 2, S.Speed(torch.device("cpu")), greedy)
    rng = np.random.default_rng(1)
    outside = [t.clone() for t in (engine.gen.temporal.keys[0][:1], engine.gen.temporal.keys[0][3:],
                                   engine.gen.streams.cache[:1], engine.gen.streams.cache[3:])]
    for t in range(6):
        pcm = torch.from_numpy((0.1 * rng.standard_normal((2, 1, 1920))).astype(np.float32))
        codes, ref_codes = engine.encode(pcm, start=1), alone.encode(pcm)
        assert torch.equal(codes, ref_codes)
        out, ref = engine.step(codes[:, :, 0], position=t, start=1), alone.step(ref_codes[:, :, 0], position=t)
        assert torch.equal(out.text, ref.text) and torch.equal(out.audio, ref.audio)
        audio = torch.where(out.valid[:, None], out.audio, 0)[:, :, None]  # placeholders decode as 0, as a tick's
        np.testing.assert_allclose(engine.decode(audio, start=1).numpy(), alone.decode(audio).numpy(), atol=1e-5)
    after = [engine.gen.temporal.keys[0][:1], engine.gen.temporal.keys[0][3:],
             engine.gen.streams.cache[:1], engine.gen.streams.cache[3:]]
    assert all(torch.equal(a, b) for a, b in zip(outside, after))
    assert engine.bucket(2, 1) is engine.bucket(2, 1)  # made once


def test_buckets_and_fit(models):
    lm, mimi, _ = models
    assert buckets(6) == [1, 2, 4, 6]
    engine = Engine(lm, mimi, 6, S.Speed(torch.device("cpu")))
    assert list(engine.buckets) == [1, 2, 4, 6] and [engine.fit(k) for k in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    assert list(Engine(lm, mimi, 6, S.Speed(torch.device("cpu")), all_buckets=False).buckets) == [6]


def test_the_condition_a_model_takes(models):
    lm, _, _ = models
    assert conditions(lm, "moshi") == (None, None)
    with pytest.raises(ValueError, match="needs a conditioned model"):
        conditions(lm, "moshi", cfg_coef=3.0)


def test_the_registry_decides_once_from_flags_and_environment(monkeypatch):
    monkeypatch.delenv("OPENMOSHI_NO_CUDA_GRAPH", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = S.choose(cpu)
    assert not on_cpu.cuda_graphs and not on_cpu.fused and on_cpu.mimi_fast == S.AUTO  # measured in prepare
    assert S.choose(cuda).cuda_graphs and S.choose(cuda).mimi_fast is None
    assert not S.choose(cuda, S.SpeedConfig(cuda_graphs=False)).cuda_graphs
    assert S.choose(cpu, S.SpeedConfig(cuda_graphs=True)).cuda_graphs  # the static-buffer discipline, eagerly
    assert S.choose(cpu, S.SpeedConfig(mimi_fast="off")).mimi_fast is None
    assert S.choose(cpu, S.SpeedConfig(mimi_fast="fp32,int8")).mimi_fast == ("fp32", "int8")
    with pytest.raises(ValueError, match="--mimi-fast"):
        S.choose(cpu, S.SpeedConfig(mimi_fast="fast"))
    monkeypatch.setenv("OPENMOSHI_NO_CUDA_GRAPH", "1")
    assert not S.choose(cuda).cuda_graphs
    assert {p.name for p in S.PATHS} == {"fused", "mimi_cpu", "cuda_graphs"}


def test_prepare_applies_the_cpu_fast_path_to_a_copy(models):
    lm, mimi, _ = models
    lm2, fast, speed = S.prepare(lm, mimi, torch.device("cpu"), S.SpeedConfig(mimi_fast="fp32,fp32"))
    assert lm2 is lm and fast is not mimi and speed.mimi_fast == ("fp32", "fp32")
    assert "mimi fast fp32,fp32" in speed.describe()
    _, same, off = S.prepare(lm, mimi, torch.device("cpu"), S.SpeedConfig(mimi_fast="off"))
    assert same is mimi and off.mimi_fast is None
