"""Capture functions of tensors as CUDA graphs, applied at the call site.

    encode = graphed(lambda pcm: mimi.encode_step(pcm, enc), cuda_graph=None, device=device)
    decode = graphed(lambda codes: mimi.decode_step(codes, dec), cuda_graph=None, device=device)
    lm_step = GraphedStep(lm, gen_state)              # generate.step, one graph per window and flags
    out = lm_step(encode(pcm)[:, :, 0])               # warm-up calls, capture, then replays
    pcm_out = decode(out.audio[:, :, None]).cpu()     # consume outputs before the next call

`CUDAGraphed` is the mechanism: tensor arguments are copied into static buffers before each
replay; non-tensor arguments (ints, flags, None) select the graph: one graph is captured per
distinct value (e.g. per attention window). The function must keep every piece of state it
mutates at fixed addresses (openmoshi's streaming states are preallocated and updated in place for
this) and must not synchronise with the host. The graphs of one wrapper share one memory pool, so
memory does not grow with the number of keys; they are never replayed concurrently, but a replay
may reuse the memory of another key's outputs: outputs are the graph's own tensors, valid only
until the next call of the same wrapper. Consume or copy them before that.

On CPU the same static-buffer discipline runs eagerly (`static=True`), so tests on CPU check that a
step does not depend on the identity of its input tensors and returns fresh values through the same
output buffers.

The one call site is `engine.Engine` (under serve, offline inference and bench); whether it wraps
is `engine.speed`'s decision, passed as `cuda_graph`: None means graphs on CUDA unless the
environment sets OPENMOSHI_NO_CUDA_GRAPH=1 (the official package's NO_CUDA_GRAPH is left to it: the
tests set it so the oracle runs eagerly), False means plain eager calls, True means the wrapper
always (on CPU: its static-buffer discipline, eagerly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from openmoshi.accel.env import env_disabled
from openmoshi.lm import generate as G

log = logging.getLogger("openmoshi.accel.cuda_graph")

ENV_OFF = "OPENMOSHI_NO_CUDA_GRAPH"


@dataclass
class _Entry:
    calls: int = 0
    inputs: list | None = None
    outputs: Any = None
    graph: Any = None


class CUDAGraphed:
    """`fn(*args)` captured per key (its non-tensor arguments) and replayed; see the module doc.

    `generators`: the `torch.Generator`s `fn` draws from besides the default one; CUDA graphs must
    register them (torch >= 2.5) so that each replay advances them like an eager call would.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, enabled: bool | None = None, static: bool = True,
                 generators: tuple[torch.Generator, ...] = (), name: str = "fn"):
        self.fn, self.warmup, self.enabled, self.static = fn, warmup, enabled, static
        self.generators, self.name = tuple(g for g in generators if g is not None), name
        self.entries: dict[tuple, _Entry] = {}  # one graph per key
        self.pool = None  # one memory pool for all the keys' graphs, made at the first capture
        self.failed = False  # a capture failed: run eagerly from then on
        self._stream = None  # side stream of the warm-up calls

    @property
    def graph(self):
        """The graph of the first captured key (None before capture); for tests and inspection."""
        return next((e.graph for e in self.entries.values() if e.graph is not None), None)

    def _graph_device(self, args) -> torch.device | None:
        """The CUDA device to capture on, None to run eagerly."""
        if self.enabled is False or self.failed:
            return None
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if not tensors or not all(t.is_cuda for t in tensors):
            return None
        return tensors[0].device

    def __call__(self, *args):
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        entry = self.entries.setdefault(key, _Entry())
        entry.calls += 1
        device = self._graph_device(args)
        if device is None:
            return self._static_eager(entry, args) if self.static and not self.failed else self.fn(*args)
        with torch.cuda.device(device):  # streams and graphs belong to the current device: the tensors' one
            return self._graphed(entry, key, args)

    def _graphed(self, entry: _Entry, key: tuple, args):
        if entry.calls <= self.warmup:  # lazy initialisations (kernels, workspaces) happen outside capture
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self._stream)
            return out
        if entry.graph is None:
            try:
                self._capture(entry, key, args)
            except Exception:  # slower is better than stopped: a server keeps serving, eagerly
                log.warning("cuda_graph_capture_failed", exc_info=True, extra={"fields": {"fn": self.name}})
                self.failed, entry.graph, entry.outputs = True, None, None
                return self.fn(*args)
        self._copy_inputs(entry, args)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, entry: _Entry, key: tuple, args) -> None:
        if self.generators and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("capturing a seeded torch.Generator needs torch >= 2.5")
        start = time.perf_counter()
        entry.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:  # before capture, as torch requires
            graph.register_generator_state(g)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.outputs = self.fn(*entry.inputs)
        entry.graph = graph
        log.debug("cuda_graph_captured", extra={"fields": {
            "fn": self.name, "key": repr(key), "graphs": sum(e.graph is not None for e in self.entries.values()),
            "ms": round(1000 * (time.perf_counter() - start), 1)}})

    @staticmethod
    def _copy_inputs(entry: _Entry, args) -> None:
        for buf, a in zip(entry.inputs, args):
            if isinstance(a, torch.Tensor):
                if a.shape != buf.shape:
                    raise ValueError(f"a CUDA graph needs fixed shapes: got {tuple(a.shape)}, captured {tuple(buf.shape)}")
                buf.copy_(a)

    def _static_eager(self, entry: _Entry, args):
        if entry.inputs is None:
            entry.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self._copy_inputs(entry, args)
        out = self.fn(*entry.inputs)
        if entry.outputs is None:
            entry.outputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        else:
            for buf, t in zip(tree_flatten(entry.outputs)[0], tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor):
                    buf.copy_(t)
        return entry.outputs


# ----------------------------------------------------------------------------- call sites


def wanted(cuda_graph: bool | None, device) -> bool:
    """Whether a call site wraps its steps in `CUDAGraphed`; see the module doc for `cuda_graph`."""
    if cuda_graph is None:
        return torch.device(device).type == "cuda" and not env_disabled(ENV_OFF)
    return bool(cuda_graph)


def graphed(fn: Callable[..., Any], cuda_graph: bool | None, device, generators=(), name: str = "fn"):
    """`fn` itself, or `fn` in a `CUDAGraphed` when `wanted(cuda_graph, device)`."""
    if not wanted(cuda_graph, device):
        return fn
    return CUDAGraphed(fn, generators=generators, name=name)


class GraphedStep:
    """`generate.step(lm, state, codes, active, generator, check=False)` for a streaming loop, as
    CUDA graphs (`cuda_graph` as `graphed`).

    A graph freezes the host-side values the step reads, so they are passed explicitly and key the
    graphs: the attention window (`generate.read_window`, which grows in buckets of 64 steps up to
    the cache capacity) and the sampler flags `state.sampler.flags` (greedy_text, greedy_audio,
    shaped_text: `set_sampling` may flip them; one object shared by a state and its prefixes).
    The window comes from the steps counted here, or from `position` when the caller knows better:
    the most steps any active slot has done since its reset (the server's slots restart at 0).
    `state.calls` is not used: a replay does not advance it. Outputs are valid until the next call.
    """

    def __init__(self, lm, state: G.GenState, cuda_graph: bool | None = None,
                 generator: torch.Generator | None = None):
        self.state, self.calls = state, 0

        def fn(codes, active, attend, greedy_text, greedy_audio, shaped_text, forcing=None, forced=None, emb=None,
               use=None):
            # The flags only key the graphs; so do `forcing` and which of forced/emb are None.
            embeddings = None if emb is None else (emb, use)
            out = G.step(lm, state, codes, active=active, generator=generator, check=False, attend=attend,
                         forced=forced, embeddings=embeddings)
            return out.text, out.audio, out.valid, out.prs

        device = state.streams.offset.device
        self.graphs = graphed(fn, cuda_graph, device, (generator,), "lm_step")
        self.enabled = isinstance(self.graphs, CUDAGraphed)

    def __call__(self, codes: torch.Tensor, active: torch.Tensor | None = None,
                 position: int | None = None, forced: torch.Tensor | None = None,
                 embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> G.StepOutput:
        """`forced` and `embeddings` as `generate.step`'s (a persona's prompt phase)."""
        position = self.calls if position is None else position
        self.calls += 1
        s, flags = self.state, self.state.sampler.flags
        extra = ()  # without forcing, the graphs' keys stay (window, flags)
        if forced is not None or embeddings is not None:
            extra = ("forcing", forced, *(embeddings if embeddings is not None else (None, None)))
        text, audio, valid, prs = self.graphs(codes, active, G.read_window(position, s), flags.greedy_text,
                                              flags.greedy_audio, flags.shaped_text, *extra)
        return G.StepOutput(text=text, audio=audio, valid=valid, prs=prs)

    def windows(self) -> dict[int, int]:
        """{attention window: a position that reads it}, for every window of a conversation."""
        capacity = self.state.temporal.capacity
        return {G.read_window(p, self.state): p for p in range(capacity)}

    def capture_all(self, codes: torch.Tensor, idle: torch.Tensor) -> int:
        """Captures (warm-up included) the graph of every window for the current sampler flags,
        with every slot idle (`idle` all False: the step then changes nothing a later step reads).
        A capture takes far longer than a step: a server does this before its first conversation.
        Returns the number of windows."""
        if not self.enabled:
            return 0
        windows, calls = self.windows(), self.calls
        for position in windows.values():
            for _ in range(self.graphs.warmup + 1):
                self(codes, idle, position)
        self.calls = calls
        return len(windows)
