"""The server's waiting line: with every slot taken, clients wait in order, told their place by
metadata messages, and start when a slot frees; a full line refuses, a long wait times out, a waiter
that leaves takes nothing with it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

from openmoshi.serving import protocol
from openmoshi.serving.waiting import ADMITTED, LEFT, STOPPING, TIMED_OUT, WaitingLine, wait_turn

from chat_client import ChatResult, chat
from server_utils import serving, tiny_models

FAST = {"max_sessions": 1, "queue_update": 0.2}  # one slot; place-in-line messages 5 times a second


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny_models()


def run(coro):
    return asyncio.run(coro)


async def until(condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def hold_slot(session, url):
    """A client that takes the slot and keeps it until closed."""
    ws = await session.ws_connect(url)
    assert (await ws.receive(timeout=10)).data == protocol.encode_handshake()
    return ws


async def place(ws) -> tuple[int, int]:
    msg = protocol.parse((await ws.receive(timeout=10)).data)
    return protocol.queue_position(msg)


def test_waiter_starts_when_the_slot_frees(models):
    async def main():
        async with serving(models, **FAST, clock="input") as (server, url, http):
            async with aiohttp.ClientSession() as s:
                first = await hold_slot(s, url)
                live = ChatResult()
                second = asyncio.create_task(chat(url, 1.0, result=live, unanswered=1, drain=30))
                await until(lambda: len(server.line) == 1 and len(live.queue) >= 2)  # told its place again
                health = await (await s.get(http + "/health")).json()
                metrics = await (await s.get(http + "/metrics")).text()
                await first.close()
                res = await second
            return res, health, metrics, server
    res, health, metrics, server = run(main())
    assert len(res.queue) >= 2 and set(res.queue) == {(1, 1)}
    assert res.handshake and not res.errors
    assert res.frames_received == res.frames_sent - 1, (res.frames_received, res.frames_sent)  # all but the first
    assert health["waiting"] == 1 and health["queue_size"] == 16 and health["active"] == 1
    assert "openmoshi_queue_waiting 1" in metrics and "openmoshi_queue_timeouts_total 0" in metrics
    assert len(server.line) == 0 and server.metrics.waiting == 0


def test_first_come_first_served(models):
    async def main():
        async with serving(models, **FAST) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                first = await hold_slot(s, url)
                waiters = []
                for i in range(3):  # one after the other, so that the order is known
                    waiters.append(asyncio.create_task(chat(url, 0.4, drain=1.0)))
                    await until(lambda: len(server.line) == i + 1)
                await first.close()
                results = await asyncio.gather(*waiters)
                await until(lambda: server.active == 0)
                return results, server
    results, server = run(main())
    for i, r in enumerate(results):
        assert r.handshake and not r.errors and r.frames_received > 0
        assert r.queue[0] == (i + 1, i + 1)  # its place when it arrived
        positions = [p for p, _ in r.queue]
        assert positions == sorted(positions, reverse=True) and positions[-1] == 1  # only moved up
    assert {(3, 3), (2, 2), (1, 1)} <= set(results[2].queue)  # told at each move
    assert results[0].handshake_at < results[1].handshake_at < results[2].handshake_at
    assert len(server.line) == 0


def test_full_line_refuses(models):
    async def main():
        async with serving(models, queue_size=1, **FAST) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                first = await hold_slot(s, url)
                waiter = await s.ws_connect(url)
                assert await place(waiter) == (1, 1)
                refused = await chat(url, 0.3)
                await first.close()
                started = (await waiter.receive(timeout=10)).data
                while started[0] == protocol.KIND_METADATA:
                    started = (await waiter.receive(timeout=10)).data
                await waiter.close()
            return refused, started, server.metrics
    refused, started, metrics = run(main())
    assert not refused.handshake and not refused.queue and refused.close_code == 1013
    assert "busy" in refused.errors[0] and "waiting line is full" in refused.errors[0]
    assert started == protocol.encode_handshake()  # the one in line still got its turn
    assert metrics.get("openmoshi_rejected_total", reason="busy") == 1


def test_waiting_too_long_times_out(models):
    async def main():
        async with serving(models, queue_timeout=0.6, **FAST) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                first = await hold_slot(s, url)
                late = await chat(url, 0.3)
                metrics = await (await s.get(http + "/metrics")).text()
                await first.close()
            return late, metrics, server
    late, metrics, server = run(main())
    assert late.queue and not late.handshake and late.close_code == 1013
    assert "no conversation slot freed up within 0.6 s" in late.errors[0]
    assert "openmoshi_queue_timeouts_total 1" in metrics and "openmoshi_queue_waiting 0" in metrics
    assert len(server.line) == 0


def test_waiter_that_leaves_is_removed(models):
    async def main():
        async with serving(models, **FAST) as (server, url, http):
            session = aiohttp.ClientSession()
            async with aiohttp.ClientSession() as s:
                first = await hold_slot(s, url)
                gone = await session.ws_connect(url)
                assert await place(gone) == (1, 1)
                live = ChatResult()
                third = asyncio.create_task(chat(url, 0.5, result=live))
                await until(lambda: len(server.line) == 2)
                gone._response.connection.transport.abort()  # the TCP connection drops
                await session.close()
                await until(lambda: len(server.line) == 1)
                waiting_after = server.metrics.waiting
                await until(lambda: live.queue[-1:] == [(1, 1)])  # told it moved up, before the slot frees
                await first.close()
                res = await third
                await until(lambda: server.active == 0)
            return res, waiting_after, server
    res, waiting_after, server = run(main())
    assert waiting_after == 1
    assert res.queue[0] == (2, 2) and res.queue[-1] == (1, 1)  # moved up when the one ahead left
    assert res.handshake and not res.errors and res.frames_received > 0
    assert len(server.line) == 0 and server.metrics.waiting == 0


def test_waiters_are_told_on_shutdown(models):
    async def main():
        async with serving(models, shutdown_grace=0.3, **FAST) as (server, url, http):
            s = aiohttp.ClientSession()
            held = await hold_slot(s, url)
            reader = asyncio.create_task(held.receive(timeout=10))  # answers the server's close
            waiter = asyncio.create_task(chat(url, 0.3))
            await until(lambda: len(server.line) == 1)
        res = await waiter
        await reader
        await s.close()
        return res
    res = run(main())
    assert not res.handshake and "shutting down" in res.errors[0] and res.close_code == 1001


def test_waiting_line_order_and_moves():
    """The line alone: admission in arrival order, only while slots are free; leavers wake the rest."""
    async def main():
        free = [0]

        def open_slot(name):
            def opener():
                if free[0] == 0:
                    return None
                free[0] -= 1
                return f"slot-{name}"
            return opener

        sizes = []
        line = WaitingLine(3, sizes.append)
        a, b, c = (line.join(open_slot(n)) for n in "abc")
        assert line.join(open_slot("d")) is None  # full
        assert [line.position(t) for t in (a, b, c)] == [1, 2, 3] and sizes == [1, 2, 3]
        assert line.admit() == 0 and a.slot is None
        c.wake.clear()
        line.leave(b)
        assert line.position(c) == 2 and c.wake.is_set() and line.position(b) == 0
        free[0] = 5
        assert line.admit() == 2 and (a.slot, c.slot) == ("slot-a", "slot-c") and sizes[-1] == 0

        # wait_turn: told its place at once and when it moves; each way out leaves the line.
        told = []

        async def tell(position, length):
            told.append((position, length))

        never = asyncio.get_running_loop().create_future()
        gone = asyncio.ensure_future(never)
        free[0] = 0
        first, second = line.join(open_slot("x")), line.join(open_slot("y"))
        waiting = asyncio.create_task(wait_turn(line, second, tell, gone, 10, 5, lambda: False))
        await asyncio.sleep(0.05)
        line.leave(first)
        await asyncio.sleep(0.05)
        free[0] = 1
        line.admit()
        assert await waiting == ADMITTED and second.slot == "slot-y" and told == [(2, 2), (1, 1)]
        t = line.join(open_slot("z"))
        assert await wait_turn(line, t, tell, gone, 0.1, 5, lambda: False) == TIMED_OUT and len(line) == 0
        t = line.join(open_slot("z"))
        assert await wait_turn(line, t, tell, gone, 10, 5, lambda: True) == STOPPING and len(line) == 0
        gone.cancel()
        t = line.join(open_slot("z"))
        assert await wait_turn(line, t, tell, gone, 10, 5, lambda: False) == LEFT and len(line) == 0
    run(main())
