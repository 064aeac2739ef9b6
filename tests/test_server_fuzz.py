"""Everything a client controls, fuzzed against a live server (issue 23): the query string of
/api/chat, its control and metadata messages, and every /v1/realtime client event field. Each case
is refused or served, never isolated in the model loop (the edge refuses what it cannot hold), and
after each one a normal conversation is served and /health is 200. Bounded here (derandomized, so
CI runs the same cases); `benchmarks/fuzz_edge.py` runs thousands."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from edge_fuzz import (chat_messages, probe, query_cases, realtime_events, run_chat_case, run_query_case,
                       run_realtime_case)
from server_utils import serving, tiny_models

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class LiveServer:
    """`serving(...)` in a thread of its own, so that hypothesis's synchronous examples can each
    run a client with asyncio.run."""

    def __init__(self, models, **config):
        self.models, self.config = models, config
        self.started = threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the server did not start"
        return self

    async def _main(self):
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        async with serving(self.models, **self.config) as (self.server, self.url, self.http):
            self.realtime = self.http.replace("http://", "ws://") + "/v1/realtime"
            self.started.set()
            await self.stop.wait()

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)

    def check(self) -> None:
        """After a case: nothing reached the model loop that it had to isolate, and a normal
        conversation is served."""
        b = self.server.loop
        assert not b.crashed and b.restarts == b.tick_errors == b.command_errors == 0, b.last_error
        asyncio.run(probe(self.url, self.http))


@pytest.fixture(scope="module")
def live():
    torch.set_num_threads(1)
    with LiveServer(tiny_models(), max_sessions=2, queue_timeout=20.0) as server:
        yield server


@settings(FUZZ, max_examples=60)
@given(query=query_cases())
def test_fuzzed_query_strings_are_refused_or_served(live, query):
    outcome = asyncio.run(run_query_case(live.url, query))
    assert outcome in ("refused", "served", "rejected"), (outcome, query)
    live.check()


@FUZZ
@given(messages=chat_messages())
def test_fuzzed_control_and_metadata_messages_leave_the_conversation_going(live, messages):
    assert asyncio.run(run_chat_case(live.url, messages)) == "served"
    live.check()


@FUZZ
@given(events=realtime_events())
def test_fuzzed_realtime_events_leave_the_session_going(live, events):
    assert asyncio.run(run_realtime_case(live.realtime, events)) == "served"
    live.check()
