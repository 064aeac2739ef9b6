"""The real-time server end to end on loopback, with tiny random models and an independent client."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import numpy as np
import pytest
import torch

from openmoshi.serving import protocol
from openmoshi.serving.opus import OpusEncoder
from openmoshi.serving.server import MoshiServer, ServerConfig, sampling_from_query, seeds_from_query
from openmoshi.lm.sampling import SamplingConfig

from chat_client import FRAME, chat
from lm_utils import TINY_7B
from openmoshi.serving.app import Runner
from server_utils import listening_socket, serving, tiny_models


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)  # 2 busy cores: OpenMP spinning on 2 threads is far slower
    return tiny_models()


def run(coro):
    return asyncio.run(coro)


def test_conversation(models):
    async def main():
        async with serving(models, max_sessions=2, clock="input") as (server, url, http):
            res = await chat(url + "?text_temperature=0.5&text_topk=10&audio_seed=3&worker_auth_id=", 2.0,
                             unanswered=1, drain=30)
            async with aiohttp.ClientSession() as s:
                health = await (await s.get(http + "/health")).json()
                metrics = await (await s.get(http + "/metrics")).text()
            return res, health, metrics, server
    res, health, metrics, server = run(main())
    assert res.handshake and not res.errors
    # The input clock: every frame is answered but the first (the first step reads initial tokens only).
    assert res.frames_received == res.frames_sent - 1, (res.frames_received, res.frames_sent)
    assert res.texts and all(isinstance(t, str) for t in res.texts)
    assert health["status"] == "ok" and health["max_sessions"] == 2
    assert "openmoshi_step_seconds_bucket" in metrics and "openmoshi_conversations_active" in metrics
    assert "openmoshi_frames_dropped_total" in metrics and "openmoshi_errors_total" in metrics


def test_load_8_clients_one_stops_reading(models):
    """8 conversations and a ninth client that stops reading: on the input clock (a frame when every
    conversation has sent its next one, so a loaded machine only slows it down) every frame of the
    8 is answered, in order, whatever the ninth does. How fast the server keeps up is benchmarks/server_soak.py's and server_load.py's business."""
    async def main():
        async with serving(models, max_sessions=9, clock="input") as (server, url, http):
            tasks = [chat(url, 8.0, unanswered=1, drain=60) for _ in range(8)] + [chat(url, 8.0, read_for=2.0, drain=0.1)]
            results = await asyncio.gather(*tasks)
            return results, server.metrics
    results, metrics = run(main())
    good = results[:8]
    for r in good:
        assert r.handshake and not r.errors and not r.cut_off
        assert r.frames_received == r.frames_sent - 1, (r.frames_received, r.frames_sent)
        assert np.all(np.diff(r.arrivals) >= 0)
    print("frames per client", [(r.frames_sent, r.frames_received) for r in results])


def test_busy_then_slot_freed(models):
    async def main():  # no waiting line: refused at once, as the official client expects a busy server
        async with serving(models, max_sessions=1, queue_size=0) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                first = await s.ws_connect(url)
                assert (await first.receive(timeout=10)).data == protocol.encode_handshake()
                busy = await chat(url, 0.5)
                await first.close()  # vanishes mid-stream
                for _ in range(50):
                    if server.active == 0:
                        break
                    await asyncio.sleep(0.05)
                again = await chat(url, 0.5)
            return busy, again
    busy, again = run(main())
    assert not busy.handshake and "busy" in busy.errors[0] and busy.close_code == 1013
    assert again.handshake and not again.errors


def test_vanishing_client_frees_slot(models):
    async def main():
        async with serving(models, max_sessions=1) as (server, url, http):
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(url)
            await ws.receive(timeout=10)
            await ws.send_bytes(b"\x01" + b"OggS")  # half a page, then the TCP connection drops
            ws._response.connection.transport.abort()
            await session.close()
            for _ in range(100):
                if server.active == 0:
                    break
                await asyncio.sleep(0.05)
            return server.active
    assert run(main()) == 0


def test_garbage_input(models, caplog):
    async def main():
        async with serving(models, max_sessions=2, max_errors=100) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(url)
                assert (await ws.receive(timeout=10)).data[:1] == b"\x00"
                bad = [b"", b"\x09abc", b"\x02\xff\xfe", b"\x03\x07", b"\x03", b"\x01" + b"garbage-not-ogg" * 4,
                       b"\x04{not json", b"\x01" + b"x" * (protocol.MAX_MESSAGE_BYTES + 10)]
                for msg in bad:
                    await ws.send_bytes(msg)
                await ws.send_str("hello")
                errors = []
                while len(errors) < len(bad) + 1:
                    msg = await ws.receive(timeout=10)
                    assert msg.type == aiohttp.WSMsgType.BINARY
                    if msg.data[0] == protocol.KIND_ERROR:
                        errors.append(msg.data[1:].decode())
                # The conversation goes on: audio sent is still answered, and pings are.
                await ws.send_bytes(protocol.encode_ping())
                encoder = OpusEncoder()
                for _ in range(10):
                    page = encoder.encode(np.zeros(1920, np.float32))
                    if page:
                        await ws.send_bytes(protocol.encode_audio(page))
                kinds = set()
                for _ in range(20):
                    kinds.add((await ws.receive(timeout=10)).data[0])
                    if {protocol.KIND_AUDIO, protocol.KIND_PING} <= kinds:
                        break
                await ws.close()
                other = await chat(url, 0.5)  # the server never noticed
            return errors, kinds, other, server.metrics
    errors, kinds, other, metrics = run(main())
    assert any("empty" in e for e in errors) and any("unknown message kind" in e for e in errors)
    assert any("UTF-8" in e for e in errors) and any("control" in e for e in errors)
    assert any("Ogg" in e for e in errors) and any("larger than" in e for e in errors)
    assert protocol.KIND_AUDIO in kinds and protocol.KIND_PING in kinds
    assert other.handshake and not other.errors
    assert metrics.get("openmoshi_errors_total", kind="protocol") >= 5
    # Every bad message is answered and counted, but only the first few are logged: a flood of
    # garbage does not flood the log.
    logged = [r for r in caplog.records if getattr(r, "fields", {}).get("kind") in ("protocol", "opus")
              and r.getMessage() == "bad_message"]
    assert len(errors) >= 9 and len(logged) == 3, [r.fields for r in logged]


def test_auth(models):
    async def main():
        async with serving(models, max_sessions=2, auth_token="s3cret") as (server, url, http):
            missing = await chat(url, 0.3)
            wrong = await chat(url + "?worker_auth_id=nope", 0.3)
            header = await chat(url, 0.3, headers={"Authorization": "Bearer s3cret"})
            query = await chat(url + "?worker_auth_id=s3cret", 0.3)
            return missing, wrong, header, query
    missing, wrong, header, query = run(main())
    for r in (missing, wrong):
        assert not r.handshake and "unauthorized" in r.errors[0] and r.close_code == 4001
    assert header.handshake and query.handshake


def test_bad_query_and_sampling():
    default = SamplingConfig()
    got = sampling_from_query({"text_temperature": "0.3", "text_topk": "5", "audio_topk": "100.0",
                               "audio_temperature": "", "pad_mult": "0", "text_seed": "42"}, default)
    assert got == SamplingConfig(temp=default.temp, top_k=100, temp_text=0.3, top_k_text=5)
    for bad in ({"text_topk": "abc"}, {"audio_temperature": "nan"}, {"text_topk": "0"}, {"pad_mult": "x"}):
        with pytest.raises(ValueError):
            sampling_from_query(bad, default)
    assert seeds_from_query({}) is None
    assert seeds_from_query({"text_seed": "42", "audio_seed": "7"}) == (42, 7)
    assert seeds_from_query({"audio_seed": "7"})[1] == 7
    for bad in ({"text_seed": "x"}, {"audio_seed": "1.5"}, {"text_seed": "-1"}):
        with pytest.raises(ValueError):
            seeds_from_query(bad)


def test_outbox_drops_oldest(models):
    from openmoshi.serving.chat import ChatProtocol
    from openmoshi.serving.session import Session

    async def main():
        server = MoshiServer(*models, ServerConfig(max_sessions=1, outbox_frames=3, static_dir=None))
        conv = Session(server, ws=None, peer="test", protocol=ChatProtocol())
        for i in range(10):
            conv.on_frame(np.full(FRAME, i, np.float32), None)
        return conv, server
    conv, server = run(main())
    assert [int(v[0]) for (_, v), _ in conv.outbox] == [7, 8, 9] and conv.dropped == 7
    assert server.metrics.get("openmoshi_frames_dropped_total", direction="out") == 7


def test_graceful_shutdown(models):
    async def main():
        server = MoshiServer(*models, ServerConfig(max_sessions=1, shutdown_grace=0.5, static_dir=None))
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/api/chat"
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(url)
            await ws.receive(timeout=10)
            t = time.monotonic()
            cleanup = asyncio.create_task(runner.stop())  # the client keeps reading meanwhile
            messages = await binary_until_close(ws, timeout=5)
            await cleanup
            return messages, time.monotonic() - t, ws.close_code
    messages, elapsed, code = run(main())
    assert any(m[:1] == b"\x05" and b"shutting down" in m for m in messages)
    assert code == 1001 and elapsed < 5


async def binary_until_close(ws, timeout: float) -> list[bytes]:
    """Every binary message until the server closes (or sends anything else)."""
    messages = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return messages
        messages.append(msg.data)


def test_self_signed_tls(models, tmp_path):
    import ssl

    from openmoshi.serving import tls

    tls.self_signed(tmp_path, ["localhost", "127.0.0.1"])
    context = tls.server_context(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        tls.server_context(tmp_path / "missing")

    async def main():
        server = MoshiServer(*models, ServerConfig(max_sessions=1, static_dir=None))
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock, context)
        client_ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        try:
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(f"wss://127.0.0.1:{sock.getsockname()[1]}/api/chat", ssl=client_ctx)
                first = await ws.receive(timeout=10)
                await ws.close()
                return first.data
        finally:
            await runner.stop()
    assert run(main()) == protocol.encode_handshake()


def test_idle_timeout_and_restart(models):
    async def main():
        async with serving(models, max_sessions=1, idle_timeout=0.6) as (server, url, http):
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(url)
                await ws.receive(timeout=10)
                await ws.send_bytes(protocol.encode_control(protocol.CONTROL_RESTART))
                encoder = OpusEncoder()  # audio after the restart is answered (none is made up: official)
                for _ in range(8):
                    page = encoder.encode(np.zeros(1920, np.float32))
                    if page:
                        await ws.send_bytes(protocol.encode_audio(page))
                got = await binary_until_close(ws, timeout=10)
                code = ws.close_code
            for _ in range(50):
                if server.active == 0:
                    break
                await asyncio.sleep(0.05)
            return got, code, server.active
    got, code, active = run(main())
    assert any(m[:1] == b"\x01" for m in got)  # frames kept coming after the restart
    assert any(m[:1] == b"\x05" and b"no message" in m for m in got) and code == 1001 and active == 0


def test_conditioned_model_gets_its_condition_in_every_slot():
    from openmoshi.engine.engine import Engine
    from openmoshi.engine.speed import Speed

    cond = {"conditioners": {"description": {"type": "lut", "lut": {
        "n_bins": 3, "dim": 8, "tokenizer": "noop", "possible_values": ["very_bad", "very_good"]}}},
        "fuser": {"sum": ["description"]}}
    lm, mimi, tok = tiny_models(lm_kwargs={**TINY_7B, **cond})
    with pytest.raises(ValueError, match="conditioned model needs condition attributes"):
        MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=2, static_dir=None))
    server = MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=2, static_dir=None),
                         condition={"description": "very_good"})
    server.loop.start()
    try:
        assert server.loop.ready.wait(10) and not server.loop.crashed
        batcher = server.loop.engine
        expected = lm.condition_sum([{"description": "very_good"}] * 2).to(batcher.gen.guidance.condition.dtype)
        assert torch.equal(batcher.gen.guidance.condition, expected) and expected.abs().sum() > 0
    finally:
        server.loop.stop()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        MoshiServer(lm, mimi, tok, ServerConfig(max_sessions=2, static_dir=None, cfg_coef=3.0),
                    condition={"description": "very_good"})
    guided = Engine(lm, mimi, 2, Speed(torch.device("cpu")), condition={"description": "very_good"}, cfg_coef=3.0,
                    negative={"description": "very_bad"})
    good = lm.condition_sum([{"description": "very_good"}] * 2)
    bad = lm.condition_sum([{"description": "very_bad"}] * 2)
    rows = torch.stack([good, bad], dim=1).view(4, 1, -1)  # slot b: its condition in row 2b, the negative in 2b + 1
    assert guided.gen.guided and torch.equal(guided.gen.guidance.condition, rows.to(guided.gen.guidance.condition.dtype))
