"""The start-up self-check of the fast paths (openmoshi/accel/self_check.py): it passes the real
paths and catches broken ones, turning them off. On CPU the fused kernels and CUDA graphs do not
run, so broken stand-ins are switched in the same way (a module class swapped in place, a step
function) to prove that the check would notice; on a GPU `benchmarks/gpu_check.sh` runs it for real."""

import logging

import pytest

from openmoshi.accel import self_check
from openmoshi.accel.cuda_graph import GraphedStep
from openmoshi.lm import generate as G
from openmoshi.modules.transformer import RMSNorm

from lm_utils import tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


class SlightlyOffNorm(RMSNorm):
    """A "fused" norm with a bug: 3% too loud."""

    def forward(self, x):
        return super().forward(x) * 1.03


class ExactNorm(RMSNorm):
    """A "fused" norm that computes what the reference does."""


def switcher(cls):
    def apply(model):
        for m in model.modules():
            if type(m) is RMSNorm:
                m.__class__ = cls

    def unapply(model):
        for m in model.modules():
            if type(m) is cls:
                m.__class__ = RMSNorm
    return apply, unapply


def norms(lm):
    return {type(m) for m in lm.modules() if isinstance(m, RMSNorm)}


def test_a_correct_fast_path_passes(lm):
    apply, unapply = switcher(ExactNorm)
    apply(lm)
    result = self_check.check_fast_paths(lm, True, True, make_step=lambda lm, s: GraphedStep(lm, s, cuda_graph=True),
                                         apply=apply, unapply=unapply)
    assert result.ok and result.fused_error < 1e-6 and result.graph_agreement == 1.0
    assert norms(lm) == {ExactNorm}  # kept
    unapply(lm)


def test_broken_fused_modules_are_caught_and_switched_off(lm, caplog):
    apply, unapply = switcher(SlightlyOffNorm)
    apply(lm)
    result = self_check.check_fast_paths(lm, True, False, apply=apply, unapply=unapply)
    assert not result.fused_ok and result.fused_error > self_check.FUSED_TOLERANCE
    assert norms(lm) == {RMSNorm}  # back on the reference modules
    with caplog.at_level(logging.WARNING):
        self_check.report(result)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fused kernels differ" in warnings[0].getMessage()
    assert "reference path" in warnings[0].getMessage()


def test_a_broken_graphed_step_is_caught(lm):
    def swapped_rows(lm, state):  # a replay that feeds each slot the other's input
        return lambda codes: G.step(lm, state, codes.flip(0), check=False)

    result = self_check.check_fast_paths(lm, False, True, make_step=swapped_rows)
    assert not result.graphs_ok and result.graph_agreement < self_check.AGREEMENT
    assert "CUDA-graphed step differs" in result.problems[0]
