"""The production streaming loops (server batcher, offline inference) through the CUDA-graph wrapper
compute exactly what they compute eagerly.

On CPU, `cuda_graph=True` runs the wrapper's static-buffer discipline eagerly (inputs copied into
fixed buffers, outputs returned through fixed buffers, one entry per attention window and sampler
flags), so these tests check on CPU everything but the capture itself: the keys, the explicit
windows, the per-slot resets between calls, and that no output is kept across calls. The
`gpu`-marked tests capture for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmoshi.serving.loop import FRAME_SIZE, Frame, Join, Leave
from openmoshi.serving.server import MoshiServer, ServerConfig
from openmoshi.lm.config import ModelConfig
from openmoshi.accel.cuda_graph import ENV_OFF, CUDAGraphed, GraphedStep, wanted
from openmoshi.inference.offline import run
from openmoshi.loading.model import LoadedModel
from openmoshi.lm.sampling import SamplingConfig

from lm_utils import TINY_7B
from server_utils import tiny_models

LONG_CONTEXT = dict(TINY_7B, context=100)  # windows 64 and 100: a conversation crosses a bucket
TICKS = 72
GREEDY = SamplingConfig.greedy()
SAMPLED = SamplingConfig(temp=0.8, top_k=20, temp_text=0.7, top_k_text=10)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny_models(lm_kwargs=LONG_CONTEXT)


@pytest.fixture(scope="module")
def cuda_models():
    lm, mimi, tok = tiny_models(lm_kwargs=LONG_CONTEXT)
    return lm.cuda(), mimi.cuda(), tok


# ----------------------------------------------------------------------------- server batcher

# tick -> commands: (kind, slot name, sampling). Slot "a" lives through the bucket boundary; "b"
# joins mid-stream (in the mixed script with sampling, which turns the greedy flags off), leaves,
# joins again, and restarts; "a" misses a frame twice (silence for that tick). The server's
# default sampling (its greedy flags when it captures) is greedy.
SCRIPTS = {
    "greedy": {0: [("join", "a", GREEDY)], 3: [("join", "b", GREEDY)], 20: [("leave", "b", None)],
               30: [("join", "b", GREEDY)], 50: [("restart", "b", None)]},
    "mixed": {0: [("join", "a", GREEDY)], 4: [("join", "b", SAMPLED)], 25: [("leave", "b", None)],
              33: [("join", "b", GREEDY)], 66: [("restart", "b", None)]},
}
LATE = {("a", 10), ("a", 45)}  # (slot, tick) without an input frame


def drive(models, script: dict, cuda_graph: bool):
    """Runs the server's model loop by hand (no thread, no clock); every frame each slot gets."""
    lm, mimi, tok = models
    server = MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=3, static_dir=None, cuda_graph=cuda_graph), GREEDY)
    loop = server.loop
    seeds = {"a": (5, 6), "b": (7, 8)}  # each slot samples from its own seeded streams
    slots, frames = {}, {name: [] for name in ("a", "b")}

    def sink(events):
        for e in events:
            if isinstance(e, Frame):
                frames[server.seats.taken[e.seat]].append((e.pcm, e.text))

    loop.sink = sink
    with torch.no_grad():
        loop.engine = loop.make_engine()
        loop.engine.capture()
        rng = np.random.default_rng(0)
        for tick in range(TICKS):
            for kind, name, sampling in script.get(tick, []):
                if kind == "join":
                    slots[name] = server.seats.open(name)
                    loop.submit(Join(slots[name], sampling, seeds[name]))
                elif kind == "leave":
                    loop.submit(Leave(slots[name]))
                    server.seats.close(slots.pop(name))
                else:
                    loop.submit(loop.rows[loop._row_of(slots[name])].join)  # the same join again
                    frames[name].append("restart")
            loop._apply_commands()
            for name, slot in sorted(slots.items()):
                pcm = (0.1 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
                if (name, tick) not in LATE:
                    loop.push(slot, pcm[None])
            loop._tick()
            loop._flush()
    return frames, loop.engine


def assert_same_frames(got: dict, ref: dict, exact: bool = True) -> None:
    for name in ref:
        assert len(got[name]) == len(ref[name]) > 20
        for g, r in zip(got[name], ref[name]):
            if isinstance(r, str):
                assert g == r
                continue
            assert g[1] == r[1]
            if exact:
                assert np.array_equal(g[0], r[0])
            else:
                np.testing.assert_allclose(g[0], r[0], atol=1e-4)


@pytest.mark.parametrize("script", ["greedy", "mixed"])
def test_batcher_static_graph_path_equals_eager(models, script):
    ref, _ = drive(models, SCRIPTS[script], False)
    got, batcher = drive(models, SCRIPTS[script], True)
    assert_same_frames(got, ref)
    texts = [item[1] for frames in ref.values() for item in frames if item != "restart"]
    assert len(set(texts)) > 3
    keys = set().union(*(b.lm_step.graphs.entries for b in batcher.buckets.values()))
    # (window, greedy_text, greedy_audio, shaped_text)
    assert {k[0] for k in keys} == {64, 100}  # every window captured before the first conversation
    assert {k[1:] for k in keys} == ({(True, True, False)} if script == "greedy"
                                     else {(True, True, False), (False, False, False)})


def test_batcher_window_follows_the_furthest_occupied_slot(models, monkeypatch):
    """The window comes from the slots' own step counts: after a restart, the small one again."""
    positions = []
    call = GraphedStep.__call__

    def spy(self, codes, active=None, position=None):
        positions.append(position)
        return call(self, codes, active, position)

    monkeypatch.setattr(GraphedStep, "__call__", spy)
    drive(models, {0: [("join", "a", GREEDY)], 67: [("restart", "a", None)]}, False)
    assert positions == list(range(67)) + list(range(TICKS - 67))


# ----------------------------------------------------------------------------- offline inference


class Tokenizer:
    def get_piece_size(self) -> int:
        return 100

    def id_to_piece(self, token: int) -> str:
        return ("\u2581" if token % 2 == 0 else "") + f"w{token}"

    def eos_id(self) -> int:
        return 2


def loaded(models, device="cpu") -> LoadedModel:
    lm, mimi, _ = models
    return LoadedModel(lm, mimi, Tokenizer(), ModelConfig(lm=lm.cfg), None, torch.device(device), torch.float32)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_inference_static_graph_path_equals_eager(models, sampling):
    model = loaded(models)
    torch.manual_seed(0)
    pcm = 0.1 * torch.randn(2, 1920 * 70)  # 70 frames: the step count crosses the 64-step bucket
    inputs = [pcm[:1], pcm[1:, :1920 * 66]]
    config = GREEDY if sampling == "greedy" else SAMPLED
    ref = run(model, inputs, config, seed=11, cuda_graph=False)
    got = run(model, inputs, config, seed=11, cuda_graph=True)
    for g, r in zip(got, ref):
        assert g.text_tokens == r.text_tokens and len(r.text_tokens) >= 66
        assert torch.equal(g.audio, r.audio)
    assert len(set(ref[0].text_tokens)) > 3


# ----------------------------------------------------------------------------- the switch


def test_cuda_graph_switch(monkeypatch):
    monkeypatch.delenv(ENV_OFF, raising=False)
    assert wanted(None, "cuda") and not wanted(None, "cpu") and not wanted(False, "cuda")
    assert wanted(True, "cpu")  # the static-buffer discipline, eagerly: what these tests use
    for value, on in (("1", False), ("yes", False), ("0", True), ("", True), ("no", True)):
        monkeypatch.setenv(ENV_OFF, value)
        assert wanted(None, "cuda") == on
    assert wanted(True, "cuda")  # an explicit choice wins


def test_cli_flags():
    from openmoshi.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--no-cuda-graph"]).no_cuda_graph
    assert not parser.parse_args(["serve"]).no_cuda_graph
    assert parser.parse_args(["infer", "x.wav", "-o", "y.wav", "--no-cuda-graph"]).no_cuda_graph


# ----------------------------------------------------------------------------- real capture (GPU)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("script", ["greedy", "mixed"])
def test_batcher_cuda_graphs_equal_eager_on_gpu(cuda_models, script):
    """Captured steps give the eager frames, for every bucket; sampled ones too, since each slot's
    random streams are state tensors that a replay advances as the eager step does."""
    ref, _ = drive(cuda_models, SCRIPTS[script], False)
    got, batcher = drive(cuda_models, SCRIPTS[script], True)
    for bucket in batcher.buckets.values():
        lm_graphs = bucket.lm_step.graphs
        assert isinstance(lm_graphs, CUDAGraphed) and not lm_graphs.failed
        captured = [e.graph for e in lm_graphs.entries.values() if e.graph is not None]
        assert len(captured) >= 2 and all(g.pool() == lm_graphs.pool for g in captured)  # one shared pool
        assert bucket.encode.graph is not None and bucket.decode.graph is not None
    assert_same_frames(got, ref, exact=False)


@pytest.mark.gpu
@cuda
def test_inference_cuda_graphs_on_gpu(cuda_models):
    """Greedy: graphs == eager. Seeded: the custom generator, registered with every graph, gives
    the same tokens run after run, and those of the eager run."""
    model = loaded(cuda_models, "cuda")
    torch.manual_seed(0)
    pcm = 0.1 * torch.randn(1, 1920 * 70)
    greedy_ref = run(model, [pcm], GREEDY, cuda_graph=False)[0]
    greedy = run(model, [pcm], GREEDY, cuda_graph=True)[0]
    assert greedy.text_tokens == greedy_ref.text_tokens
    torch.testing.assert_close(greedy.audio, greedy_ref.audio, atol=1e-4, rtol=0)
    first = run(model, [pcm], SAMPLED, seed=11, cuda_graph=True)[0]
    again = run(model, [pcm], SAMPLED, seed=11, cuda_graph=True)[0]
    assert first.text_tokens == again.text_tokens and torch.equal(first.audio, again.audio)
    eager = run(model, [pcm], SAMPLED, seed=11, cuda_graph=False)[0]
    assert first.text_tokens == eager.text_tokens


@pytest.mark.gpu
@cuda
def test_cuda_graph_keys_share_one_memory_pool_on_gpu():
    """Sixteen keys (as many attention windows) cost about one key's memory for intermediates."""
    w = torch.randn(64, 65536, device="cuda")

    def fn(x, n):
        return torch.relu(x @ w)[:, :n].sum(dim=1)  # two 16 MB intermediates, a [64] output

    graphed = CUDAGraphed(fn, warmup=1)
    x = torch.randn(64, 64, device="cuda")
    for _ in range(2):
        graphed(x, 64)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what remains reserved: the graphs' pool and the buffers kept alive
    one = torch.cuda.memory_reserved()
    for n in range(128, 1024 + 1, 64):
        for _ in range(2):  # warm-up, then capture and replay
            out = graphed(x, n)
        torch.testing.assert_close(out, fn(x, n))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert len(graphed.entries) == 16 and all(e.graph.pool() == graphed.pool for e in graphed.entries.values())
    assert torch.cuda.memory_reserved() - one < 2 ** 20 * 100  # 15 pools of their own: about 500 MB
