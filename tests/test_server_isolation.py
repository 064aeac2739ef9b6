"""One request never takes the server down (issue 23): values a client sends are refused at the edge
unless the model loop can hold them; a command or a tick that fails anyway ends only the
conversations it touched, and the loop goes on; a loop that dies is restarted, and one that keeps
dying makes `openmoshi serve` exit non-zero instead of staying up serving nobody."""

from __future__ import annotations

import asyncio
import dataclasses
from urllib.parse import quote

import aiohttp
import pytest
import torch

from openmoshi.lm.sampling import SamplingConfig
from openmoshi.serving import server as server_module
from openmoshi.serving.server import CLOSE_INTERNAL_ERROR, CLOSE_BAD_REQUEST

from chat_client import chat
from server_utils import serving, tiny_models


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny_models()


def run(coro):
    return asyncio.run(coro)


async def health(http: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(http + "/health") as r:
            return r.status, await r.json()


async def still_serves(url: str, http: str) -> None:
    """A normal conversation gets its handshake and audio back, and /health says ok."""
    res = await chat(url, 0.6)
    assert res.handshake and not res.errors, res
    assert res.frames_received >= 3, res
    status, body = await health(http)
    assert status == 200 and body["status"] == "ok", body


# The values of the outage report, and neighbours: each is refused with its value quoted, or served.
REFUSED = [("text_temperature", "1e39"), ("pad_mult", "1e308"), ("repetition_penalty", "1e39"),
           ("repetition_penalty_context", "1e20"), ("audio_temperature", "-1"), ("text_topk", "1e400"),
           ("audio_topk", "9" * 40), ("pad_mult", "nan"), ("text_seed", "-5"), ("audio_seed", "1" * 30),
           ("repetition_penalty", "0"), ("text_topk", "\u0661\u0662"), ("text_temperature", "1_0")]
SERVED = [("text_temperature", "0"), ("audio_topk", "1e0"), ("text_topk", "100000"), ("pad_mult", "-1e6"),
          ("repetition_penalty", "1e3"), ("text_seed", str(2 ** 62 - 1)), ("unknown_param", "1e999")]


def test_odd_query_values_are_refused_at_the_edge_or_served(models):
    async def main():
        async with serving(models, max_sessions=2) as (server, url, http):
            refused = {}
            for name, raw in REFUSED:
                refused[name, raw] = await chat(f"{url}?{name}={quote(raw)}", 0.2)
            served = {}
            for name, raw in SERVED:
                served[name, raw] = await chat(f"{url}?{name}={quote(raw)}", 0.4)
            await still_serves(url, http)
            return refused, served, server.loop
    refused, served, batcher = run(main())
    for (name, raw), res in refused.items():
        assert not res.handshake and res.close_code == CLOSE_BAD_REQUEST, (name, raw, res)
        # The message names the parameter and quotes what the client sent.
        assert f"{name}={raw!r}"[:30] in res.errors[0] or f"{name}={raw[:37]!r}" in res.errors[0], res.errors
    for key, res in served.items():
        assert res.handshake and not res.errors and res.frames_received >= 2, (key, res)
    assert batcher.tick_errors == 0 and batcher.restarts == 0 and not batcher.crashed


def test_a_repeated_parameter_with_two_values_is_refused(models):
    async def main():
        async with serving(models, max_sessions=1) as (server, url, http):
            twice = await chat(f"{url}?text_temperature=0.5&text_temperature=1e39", 0.2)
            same = await chat(f"{url}?text_temperature=0.5&text_temperature=0.5", 0.3)
            return twice, same
    twice, same = run(main())
    assert not twice.handshake and "given 2 times" in twice.errors[0] and "'1e39'" in twice.errors[0]
    assert same.handshake and not same.errors


def _unchecked(**values) -> SamplingConfig:
    """A SamplingConfig that skipped its own checks: what reached the model loop before the fix."""
    bad = object.__new__(SamplingConfig)
    for f in dataclasses.fields(SamplingConfig):
        object.__setattr__(bad, f.name, values.get(f.name, f.default))
    return bad


def test_a_command_the_model_cannot_apply_ends_that_conversation_only(models, monkeypatch):
    """The outage itself: 1e39 written into a float32 slot tensor raised inside the model thread,
    and the thread died. A value that slips past the edge now ends its own conversation only."""
    checked = server_module.sampling_from_query

    def sneaky(query, default):
        return _unchecked(temp_text=1e39) if "evil" in query else checked(query, default)

    monkeypatch.setattr(server_module, "sampling_from_query", sneaky)

    async def main():
        async with serving(models, max_sessions=2) as (server, url, http):
            other = asyncio.create_task(chat(url, 2.0))
            await asyncio.sleep(0.5)
            evil = await chat(url + "?evil=1", 0.3)
            other = await other
            await still_serves(url, http)
            return evil, other, server.loop, await health(http)
    evil, other, batcher, (_, body) = run(main())
    assert not evil.handshake and evil.close_code == CLOSE_INTERNAL_ERROR
    assert "internal error" in evil.errors[0] and "settings" in evil.errors[0]
    assert other.handshake and not other.errors and other.frames_received >= other.frames_sent - 2, other
    assert not batcher.crashed and batcher.restarts == 0
    assert "overflow" in body["model_loop"]["last_error"], body


class FailOnce:
    """A stand-in for a bucket's LM step that raises on the `after`-th call of all the buckets
    sharing `calls` (phase groups tick on several), then steps normally."""

    def __init__(self, step, after: int, calls: list):
        self.step, self.calls, self.after = step, calls, after

    def __getattr__(self, name):
        return getattr(self.step, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(1)
        if len(self.calls) == self.after:
            raise RuntimeError("injected failure of one tick")
        return self.step(*args, **kwargs)


def test_a_tick_that_raises_ends_only_its_conversations(models):
    async def main():
        async with serving(models, max_sessions=4) as (server, url, http):
            b = server.loop
            calls = []
            for bucket in b.engine.buckets.values():
                bucket.lm_step = FailOnce(bucket.lm_step, after=10, calls=calls)
            first = await asyncio.gather(chat(url, 2.0), chat(url, 2.0))
            after = await health(http)
            await still_serves(url, http)
            return first, after, b, server
    first, (status, body), batcher, server = run(main())
    # Those in the tick that failed were ended with the reason, code 1011; with phase groups the
    # other may have been in a tick of its own, and then it went on to its end undisturbed.
    ended = [res for res in first if res.close_code == CLOSE_INTERNAL_ERROR]
    assert ended, first
    for res in ended:
        assert res.handshake and any("internal error" in e and "frame" in e for e in res.errors), res.errors
        assert res.frames_received < res.frames_sent
    for res in first:
        if all(res is not e for e in ended):
            assert res.handshake and not res.errors and res.frames_received > 0, res
    assert status == 200 and body["model_loop"]["failed_ticks"] == 1
    assert "injected failure" in body["model_loop"]["last_error"]
    assert batcher.restarts == 0 and server.active == 0


def test_a_dead_model_loop_is_restarted_and_serves_again(models):
    async def main():
        async with serving(models, max_sessions=2) as (server, url, http):
            b = server.loop
            compact = b._compact
            state = {"calls": 0}

            def dies_once():
                state["calls"] += 1
                if state["calls"] == 30:  # during a conversation
                    raise RuntimeError("injected death of the model loop")
                compact()

            b._compact = dies_once
            victim = await chat(url, 2.5)
            await still_serves(url, http)
            return victim, await health(http), b
    victim, (status, body), batcher = run(main())
    assert victim.handshake and victim.close_code == CLOSE_INTERNAL_ERROR and "restarting" in victim.errors[0]
    assert status == 200 and body["model_loop"]["restarts"] == 1 and not batcher.crashed


def test_a_loop_that_keeps_dying_makes_serve_exit_nonzero(models, monkeypatch):
    """Never up serving nobody: after MAX_RESTARTS quick deaths the server refuses clients, /health
    says crashed, and the command's serve loop returns a non-zero exit code."""
    from openmoshi.cli.serve import EXIT_MODEL_FAILED, _serve
    from openmoshi.serving.loop import ModelLoop
    from openmoshi.serving.server import MoshiServer, ServerConfig
    from server_utils import listening_socket

    def always(self):
        raise RuntimeError("injected: the model loop cannot run")

    async def main():
        server = MoshiServer(*models, ServerConfig(max_sessions=1, static_dir=None, shutdown_grace=0.1))
        sock = listening_socket()
        port = sock.getsockname()[1]
        monkeypatch.setattr(ModelLoop, "_compact", always)
        code = await asyncio.wait_for(_serve(server, sock, None, f"http://127.0.0.1:{port}/"), 60)
        return code, server.health(), server.loop
    code, (status, body), batcher = run(main())
    assert code == EXIT_MODEL_FAILED != 0
    assert batcher.crashed and status == 503 and body["status"] == "crashed"
    assert "cannot run" in body["model_loop"]["last_error"]


def test_a_crashed_server_refuses_new_clients_instead_of_queueing_them(models, monkeypatch):
    async def main():
        async with serving(models, max_sessions=1) as (server, url, http):
            server.loop.crashed = True  # what the worker sets when it gives up
            res = await chat(url, 0.2)
            server.loop.crashed = False
            return res
    res = run(main())
    assert not res.handshake and res.close_code == 1013 and "cannot serve" in res.errors[0] and not res.queue
