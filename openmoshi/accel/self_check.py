"""A start-up self-check of the fast paths against the reference, before a server or a run uses them.

The fused Triton kernels and the CUDA graphs must never produce wrong audio silently (they are
the paths a test machine without a GPU cannot run). Before serving, `check_fast_paths` runs a few
frames of random input through each and compares with the reference:

    fused modules    the temporal transformer's text logits and hidden state, teacher-forced on
                     the same random tokens, with the fused modules and with the reference ones
                     (switched back and forth in place, no second copy of the weights):
                     relative error (norm of the difference / norm of the reference) at most
                     FUSED_TOLERANCE, and the greedy text token equal in at least AGREEMENT of
                     the frames (bf16 rounding differs between kernels; a near tie may flip one).
    graphed step     `GraphedStep` (captured graphs, replayed) against eager `generate.step` on a
                     fresh greedy state and the same user codes, same modules: the replays run
                     the same kernels, so every token of every frame agrees in at least AGREEMENT
                     of the (frame, stream) pairs.

A failed check says what failed and by how much; the caller then runs the reference path
(`fused.unapply`, cuda_graph=False) and warns once. On CPU there is nothing to check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openmoshi.accel import fused
from openmoshi.accel.cuda_graph import GraphedStep
from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig

log = logging.getLogger("openmoshi.accel.self_check")

STEPS = 6  # frames per comparison
BATCH = 2
FUSED_TOLERANCE = 0.02
AGREEMENT = 0.9


@dataclass
class CheckResult:
    fused_ok: bool = True
    graphs_ok: bool = True
    fused_error: float | None = None  # worst relative error of the logits over the frames
    graph_agreement: float | None = None  # share of (frame, stream) tokens equal to eager
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.fused_ok and self.graphs_ok


def _random_tokens(lm, generator: torch.Generator, device) -> torch.Tensor:
    """[BATCH, K, STEPS] tokens in range for every stream (text first)."""
    cfg = lm.cfg
    audio = torch.randint(0, cfg.card, (BATCH, cfg.num_codebooks - 1, STEPS), generator=generator)
    text = torch.randint(0, cfg.text_card, (BATCH, 1, STEPS), generator=generator)
    return torch.cat([text, audio], dim=1).to(device)


@torch.no_grad()
def _teacher_forced(lm, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden, text logits) per frame, each frame fed the given tokens, from a fresh cache."""
    state = lm.transformer.init_state(tokens.shape[0], device=tokens.device, dtype=lm.text_emb.weight.dtype,
                                      capacity=None if lm.cfg.context else 4096)
    condition = None
    if lm.condition_provider is not None:
        condition = torch.zeros(tokens.shape[0], 1, lm.cfg.dim, device=tokens.device, dtype=lm.text_emb.weight.dtype)
    out = []
    for t in range(tokens.shape[2]):
        hidden, logits = lm.forward_text(tokens[:, :, t:t + 1], state, None, condition, None)
        out.append((hidden.float(), logits.float()))
    return out


def compare_modules(lm, make_fast: Callable[[], None], make_reference: Callable[[], None],
                    generator: torch.Generator) -> tuple[float, float]:
    """(worst relative error, greedy agreement) of the text logits and hidden states with the
    fast modules (`make_fast()` switches them in) against the reference ones; leaves them fast."""
    device = lm.text_emb.weight.device
    tokens = _random_tokens(lm, generator, device)
    make_reference()
    ref = _teacher_forced(lm, tokens)
    make_fast()
    got = _teacher_forced(lm, tokens)
    error, agree = 0.0, 0
    for (h, x), (h_ref, x_ref) in zip(got, ref):
        for a, b in ((h, h_ref), (x, x_ref)):
            error = max(error, float((a - b).norm() / b.norm().clamp(min=1e-12)))
        agree += int((x.argmax(-1) == x_ref.argmax(-1)).sum())
    return error, agree / (len(ref) * tokens.shape[0])


@torch.no_grad()
def compare_graphs(lm, make_step: Callable, generator: torch.Generator) -> float:
    """Share of (frame, stream) tokens that a `make_step(lm, state)` step (the graphed one) gives
    equal to eager `generate.step`, greedy, from fresh states on the same random user codes."""
    cfg = lm.cfg
    device = lm.text_emb.weight.device
    user = torch.randint(0, cfg.card, (BATCH, cfg.num_user_codebooks, STEPS + cfg.max_delay + 1),
                         generator=generator).to(device)
    outputs = []
    for fast in (False, True):
        state = G.init_state(lm, BATCH, SamplingConfig.greedy())
        step = make_step(lm, state) if fast else (lambda codes, s=state: G.step(lm, s, codes, check=False))
        frames = []
        for t in range(user.shape[2]):
            out = step(user[:, :, t])
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1).clone())
        outputs.append(torch.stack(frames))
    eager, graphed = outputs
    return float((eager == graphed).float().mean())


def check_fast_paths(lm, use_fused: bool, use_graphs: bool, seed: int = 0, make_step: Callable = GraphedStep,
                     apply: Callable = fused.apply, unapply: Callable = fused.unapply) -> CheckResult:
    """Checks the fused modules (when `use_fused`; `apply(lm)`/`unapply(lm)` switch them) and the
    graphed step (when `use_graphs`) against the reference; a failed fused check leaves `lm` on the
    reference modules. The caller turns off what failed (`engine.speed.prepare`)."""
    result = CheckResult()
    generator = torch.Generator().manual_seed(seed)
    problems = []
    if use_fused:
        result.fused_error, agreement = compare_modules(lm, lambda: apply(lm), lambda: unapply(lm), generator)
        if result.fused_error > FUSED_TOLERANCE or agreement < AGREEMENT:
            result.fused_ok = False
            unapply(lm)
            problems.append(f"the fused kernels differ from the reference modules (relative error "
                            f"{result.fused_error:.3g}, limit {FUSED_TOLERANCE}; greedy text agreement "
                            f"{agreement:.0%})")
    if use_graphs:
        result.graph_agreement = compare_graphs(lm, make_step, generator)
        if result.graph_agreement < AGREEMENT:
            result.graphs_ok = False
            problems.append(f"the CUDA-graphed step differs from the eager step ({result.graph_agreement:.0%} "
                            f"of tokens agree, at least {AGREEMENT:.0%} expected)")
    result.problems = tuple(problems)
    return result


def report(result: CheckResult) -> None:
    """One log line: the check passed (with its numbers), or one warning naming each fallback."""
    fields = {"fused_error": result.fused_error, "graph_agreement": result.graph_agreement}
    if result.ok:
        log.info("fast_paths_checked", extra={"fields": fields})
        return
    log.warning("fast paths failed their start-up self-check, running the slower reference path "
                "instead: %s. Please report this with your GPU, driver, torch and triton versions.",
                "; ".join(result.problems), extra={"fields": fields})
