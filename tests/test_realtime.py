"""The OpenAI-Realtime-compatible endpoint `/v1/realtime` on loopback with tiny random models, driven
by the clients voice agents use (the official `openai` SDK, LiveKit Agents, Pipecat) and by a raw
websocket client that checks every event against Pipecat's own event models (its pieces alone:
test_realtime_parts.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import numpy as np
import pytest

from openmoshi.serving.realtime import g711
from openmoshi.serving.realtime.formats import Resampler

from realtime_utils import (FRAME, RATE, Raw, check_responses, check_with_pipecat, models,  # noqa: F401 (fixtures)
                            pcm16_b64, realtime_url, run, speech, tone)
from server_utils import serving


@pytest.mark.slow
def test_openai_sdk_session(models, speech):
    """The official SDK, as its users write it: speech in; VAD events, audio and transcript deltas,
    and completed responses out."""
    from openai import AsyncOpenAI

    async def main():
        async with serving(models, max_sessions=2) as (server, _, http):
            client = AsyncOpenAI(base_url=http + "/v1", api_key="anything")
            got, raw = [], []
            async with client.realtime.connect(model="gpt-realtime") as conn:
                parse = conn.parse_event  # the SDK parses every event it receives here: keep the JSON too
                conn.parse_event = lambda data: (raw.append(json.loads(data)), parse(data))[1]

                async def reader():
                    async for ev in conn:
                        got.append(ev)

                reading = asyncio.create_task(reader())
                await conn.session.update(session={"type": "realtime", "instructions": "Be brief.",
                                                   "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
                start = time.monotonic()
                for i, at in enumerate(range(0, speech.size, FRAME)):
                    await conn.input_audio_buffer.append(audio=pcm16_b64(speech[at:at + FRAME]))
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))
                for _ in range(40):  # the last response may still be running
                    if [e.type for e in got].count("response.created") == [e.type for e in got].count("response.done"):
                        break
                    await asyncio.sleep(0.1)
                reading.cancel()
            return got, raw
    got, raw = run(main())
    assert [e["type"] for e in raw] == [e.type for e in got]
    check_with_pipecat(raw)
    # What the SDK received, in the API's order (the client closes while Moshi may be speaking).
    assert [d["response"]["id"] for d in check_responses(raw, cut_by_close=True)] == [
        e.response.id for e in got if e.type == "response.done"]
    kinds = [e.type for e in got]
    assert kinds[0] == "session.created" and got[0].session.model == "gpt-realtime"
    updated = got[kinds.index("session.updated")]
    assert "instructions" in updated.model_extra["ignored"]  # accepted, and said not to apply
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.output_audio.delta",
                 "response.output_audio_transcript.delta"):
        assert kind in kinds, kind
    done = [e for e in got if e.type == "response.done"]
    assert done and all(d.response.status == "completed" for d in done)
    audio = b"".join(base64.b64decode(e.delta) for e in got if e.type == "response.output_audio.delta")
    assert len(audio) % (2 * FRAME) == 0 and len(audio) // (2 * FRAME) >= sum(d.response.usage.output_token_details.audio_tokens
                                                                            for d in done)
    assert any(d.response.output[0].content[0].transcript for d in done)


def test_event_order_ids_cancel_and_pipecat_models(models, speech):
    """Every event parses with Pipecat's models; responses follow the API's order and never overlap;
    response.cancel ends the audio within one frame; response.create's metadata comes back."""
    async def main():
        async with serving(models, max_sessions=1) as (server, _, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                streaming = asyncio.create_task(c.stream(np.concatenate([speech, tone(8.0)])))
                # Cancel a response right after its first audio.
                i = await c.wait_for(lambda e: e["type"] == "response.output_audio.delta", 15)
                rid = c.events[i]["response_id"]
                await c.send(type="response.cancel", event_id="cancel_1")
                sent_at = len(c.events)
                j = await c.wait_for(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid, start=i)
                await c.send(type="response.cancel", event_id="cancel_2")  # nothing active any more
                k = await c.wait_for(lambda e: e["type"] == "error", start=j)
                # response.create while Moshi speaks: the next stretch of speech answers it, with its metadata.
                a = await c.wait_for(lambda e: e["type"] == "response.created", 15, start=j)
                await c.send(type="response.create", event_id="ask", response={"metadata": {"client_event_id": "abc"}})
                d = await c.wait_for(lambda e: e["type"] == "response.done", 15, start=a)
                m = await c.wait_for(lambda e: e["type"] == "response.created", 15, start=d)
                await c.wait_for(lambda e: e["type"] == "response.done", 15, start=m)
                streaming.cancel()
                return c.events, (i, sent_at, j, k, a, d, m), rid
    events, (i, sent_at, j, k, a, d, m), rid = run(main())
    check_with_pipecat(events)
    done = check_responses(events, cut_by_close=True)  # the client closes while Moshi may be speaking
    assert len(done) >= 3
    cancelled = events[j]["response"]
    assert cancelled["status"] == "cancelled" and cancelled["output"][0]["status"] == "incomplete"
    late = [e for e in events[sent_at:j] if e["type"] == "response.output_audio.delta"]
    assert len(late) <= 1, f"{len(late)} audio frames after response.cancel"
    assert not [e for e in events[j:] if e.get("response_id") == rid]
    assert events[k]["error"]["code"] == "response_cancel_not_active" and events[k]["error"]["event_id"] == "cancel_2"
    assert events[a]["response"]["metadata"] is None and events[d]["response"]["metadata"] is None
    assert events[m]["response"]["metadata"] == {"client_event_id": "abc"}
    assert sum(e["type"] == "response.created" and e["response"]["metadata"] is not None for e in events) == 1


def test_telephone_formats_and_sampling(models):
    """audio/pcmu in and out (8 kHz, one byte a sample), the beta names too, and a temperature
    that reaches the model's sampler for this conversation's slot only."""
    async def main():
        async with serving(models, max_sessions=1) as (server, _, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                fmt = {"type": "audio/pcmu"}
                await c.send(type="session.update", session={"type": "realtime", "audio": {
                    "input": {"format": fmt, "turn_detection": None}, "output": {"format": fmt}}})
                u = await c.wait_for(lambda e: e["type"] == "session.updated")
                ulaw = g711.encode(np.round(Resampler(RATE, 8000)(tone(3.0)) * 32767).astype(np.int16), g711.ULAW)
                await c.stream(np.frombuffer(ulaw, np.uint8), encode=lambda b: base64.b64encode(b.tobytes()).decode(),
                               chunk=640)
                await c.send(type="session.update", session={"input_audio_format": "g711_alaw", "temperature": 0.4})
                b = await c.wait_for(lambda e: e["type"] == "session.updated", start=u + 1)
                for _ in range(50):
                    if abs(float(server.loop.engine.gen.sampler.temp[0]) - 0.4) < 1e-6:
                        break
                    await asyncio.sleep(0.05)
                return c.events, u, b, float(server.loop.engine.gen.sampler.temp[0]), float(server.loop.engine.gen.sampler.temp_text[0])
    events, u, b, temp, temp_text = run(main())
    check_with_pipecat(events)
    assert events[u]["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert events[u]["session"]["audio"]["input"]["turn_detection"] is None
    assert not [e for e in events if e["type"].startswith("input_audio_buffer.speech")]  # no VAD asked for
    deltas = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"]
    assert deltas and all(len(d) == FRAME // 3 for d in deltas)
    assert events[b]["session"]["audio"]["input"]["format"] == {"type": "audio/pcma"}
    assert temp == pytest.approx(0.4) and temp_text == pytest.approx(0.7 * 0.4 / 0.8)


def test_malformed_events_get_errors_and_the_session_goes_on(models):
    async def main():
        async with serving(models, max_sessions=1, max_errors=50) as (server, _, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                bad = ["{not json", '"a string"', '{"type": 7}', '{"type": "response.teleport"}',
                       '{"type": "input_audio_buffer.append", "audio": "%%%"}',
                       '{"type": "input_audio_buffer.append"}',
                       '{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", '
                       '"rate": 16000}}}}}',
                       '{"type": "session.update", "session": {"turn_detection": {"type": "magic"}}}',
                       '{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": -1}',
                       '{"type": "conversation.item.create", "item": {"type": "poem"}}',
                       '{"type": "conversation.item.retrieve", "item_id": "missing"}',
                       '{"type": "input_audio_buffer.commit"}', '{"type": "response.cancel"}']
                for data in bad:
                    await ws.send_str(data)
                await ws.send_bytes(b"\x01binary")
                await c.wait_for(lambda e: sum(x["type"] == "error" for x in c.events) >= len(bad) + 1)
                # Still going: settings apply, items are acknowledged, audio flows.
                await c.send(type="session.update", session={"instructions": "x", "tools": [], "voice": "alloy"})
                await c.send(type="conversation.item.create", item={"id": "it1", "type": "message", "role": "user",
                                                                   "content": [{"type": "input_text", "text": "hi"}]})
                await c.send(type="conversation.item.truncate", item_id="it1", content_index=0, audio_end_ms=10)
                await c.send(type="conversation.item.delete", item_id="it1")
                await c.send(type="input_audio_buffer.clear")
                await c.stream(tone(1.5))
                await c.wait_for(lambda e: e["type"] == "response.output_audio.delta")
                return c.events, server.metrics.get("openmoshi_errors_total", kind="realtime")
    events, counted = run(main())
    check_with_pipecat(events)
    codes = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert codes[:4] == ["invalid_json", "invalid_json", "missing_required_parameter", "invalid_value"]
    assert {"item_not_found", "input_audio_buffer_commit_empty", "response_cancel_not_active"} <= set(codes)
    assert len(codes) == 14 and counted == 14
    updated = [e for e in events if e["type"] == "session.updated"]
    assert len(updated) == 1 and {"instructions", "tools", "voice"} <= set(updated[0]["ignored"])
    kinds = [e["type"] for e in events]
    for kind in ("conversation.item.added", "conversation.item.truncated", "conversation.item.deleted",
                 "input_audio_buffer.cleared"):
        assert kind in kinds


def test_both_endpoints_share_the_batch_and_a_full_server_says_so(models):
    from chat_client import chat

    async def main():
        async with serving(models, max_sessions=2, queue_size=0) as (server, url, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                rows = []

                async def watch():  # conversations in the model loop's rows at once: phase groups may tick
                    while True:       # them apart, so sharing the rows (one engine), not each tick, is the claim
                        rows.append(sum(r is not None for r in server.loop.rows))
                        await asyncio.sleep(0.05)

                watching = asyncio.create_task(watch())
                other = asyncio.create_task(chat(url, 3.0))
                streaming = asyncio.create_task(c.stream(tone(4.0)))
                for _ in range(200):  # until both conversations hold their slots
                    if server.active == 2:
                        break
                    await asyncio.sleep(0.05)
                assert server.active == 2
                async with s.ws_connect(realtime_url(http)) as third:  # both slots are taken
                    first = await third.receive(timeout=10)
                    closing = await third.receive(timeout=10)
                result = await other
                await streaming
                watching.cancel()
                return c.events, result, rows, json.loads(first.data), closing, third.close_code, server.metrics
    events, result, rows, refusal, closing, code, metrics = run(main())
    assert result.handshake and not result.errors and result.frames_received > 10
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    assert max(rows) == 2, "the two conversations were never in the model loop's rows together"
    check_with_pipecat([refusal])
    assert refusal["type"] == "error" and "busy" in refusal["error"]["message"]
    assert closing.type == aiohttp.WSMsgType.CLOSE and code == 1013
    assert metrics.get("openmoshi_rejected_total", reason="busy") == 1


def test_auth_by_header_and_by_browser_subprotocol(models):
    from openai import AsyncOpenAI

    async def main():
        async with serving(models, max_sessions=2, auth_token="s3cret") as (server, _, http):
            client = AsyncOpenAI(base_url=http + "/v1", api_key="s3cret")
            async with client.realtime.connect(model="moshi") as conn:
                by_header = (await conn.recv()).type
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(realtime_url(http),
                                        protocols=("realtime", "openai-insecure-api-key.s3cret")) as ws:
                    by_protocol = json.loads((await ws.receive(timeout=10)).data)["type"], ws.protocol
                async with s.ws_connect(realtime_url(http), headers={"Authorization": "Bearer wrong"}) as ws:
                    wrong = json.loads((await ws.receive(timeout=10)).data)
                    await ws.receive(timeout=10)
                    wrong_code = ws.close_code
            return by_header, by_protocol, wrong, wrong_code
    by_header, by_protocol, wrong, wrong_code = run(main())
    assert by_header == "session.created" and by_protocol == ("session.created", "realtime")
    assert wrong["type"] == "error" and "unauthorized" in wrong["error"]["message"] and wrong_code == 4001


@pytest.mark.slow
def test_livekit_agents_session(models, speech):
    """LiveKit Agents' OpenAI realtime plugin as its users configure it (a base URL): its default
    semantic VAD hears the user, generate_reply gets its response, audio and text stream out."""
    from livekit import rtc
    from livekit.plugins.openai.realtime import RealtimeModel

    async def main():
        async with serving(models, max_sessions=1) as (server, _, http):
            async with aiohttp.ClientSession() as hs:
                session = RealtimeModel(api_key="x", base_url=http + "/v1", http_session=hs).session()
                got = {"generations": 0, "frames": 0, "text": [], "errors": [], "speech": [], "events": []}

                async def consume(gen):
                    got["generations"] += 1
                    async for message in gen.message_stream:
                        async def text():
                            async for t in message.text_stream:
                                got["text"].append(t)

                        async def audio():
                            async for _ in message.audio_stream:
                                got["frames"] += 1
                        await asyncio.gather(text(), audio())

                tasks = []
                session.on("generation_created", lambda g: tasks.append(asyncio.create_task(consume(g))))
                session.on("error", lambda e: got["errors"].append(e))
                session.on("openai_server_event_received", got["events"].append)  # the raw JSON it read
                session.on("input_speech_started", lambda e: got["speech"].append("started"))
                session.on("input_speech_stopped", lambda e: got["speech"].append("stopped"))
                pcm = np.concatenate([speech, np.zeros(-speech.size % FRAME, np.float32)])
                pcm16 = np.round(pcm * 32767).astype(np.int16)
                start = time.monotonic()
                for i, at in enumerate(range(0, pcm16.size, FRAME)):
                    session.push_audio(rtc.AudioFrame(pcm16[at:at + FRAME].tobytes(), RATE, 1, FRAME))
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))
                reply = await asyncio.wait_for(session.generate_reply(), 15)
                await asyncio.sleep(1.0)
                await session.aclose()
                return got, reply
    got, reply = run(main())
    assert not got["errors"], got["errors"]
    check_with_pipecat(got["events"])
    # What LiveKit received, in the API's order (it closes while Moshi may be speaking).
    done = check_responses(got["events"], cut_by_close=True)
    assert done
    assert got["speech"][:2] == ["started", "stopped"]
    assert got["generations"] >= 2 and got["frames"] > 0 and "".join(got["text"]).strip()
    assert reply.user_initiated  # its response.create's metadata came back in response.created


@pytest.mark.slow
def test_pipecat_service(models, speech, monkeypatch):
    """Pipecat's OpenAIRealtimeLLMService in a pipeline, as its users configure it (a base URL):
    the user's speech in, Moshi's audio and words out, and no error (its errors end a session)."""
    from pipecat.frames.frames import (EndFrame, ErrorFrame, InputAudioRawFrame, LLMFullResponseEndFrame,
                                       TTSAudioRawFrame, TTSTextFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    class Sink(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.counts: dict[type, int] = {}
            self.errors: list = []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            self.counts[type(frame)] = self.counts.get(type(frame), 0) + 1
            if isinstance(frame, ErrorFrame):
                self.errors.append(frame.error)
            await self.push_frame(frame, direction)

    received = []  # Pipecat parses every event it receives with this function: keep the JSON too
    parse = events.parse_server_event
    monkeypatch.setattr(events, "parse_server_event", lambda data: (received.append(json.loads(data)), parse(data))[1])

    async def main():
        async with serving(models, max_sessions=1) as (server, _, http):
            llm = OpenAIRealtimeLLMService(api_key="x", base_url=http.replace("http://", "ws://") + "/v1/realtime")
            sink = Sink()
            worker = PipelineWorker(Pipeline([llm, sink]), params=PipelineParams(audio_in_sample_rate=RATE,
                                                                                  audio_out_sample_rate=RATE))
            runner = WorkerRunner(handle_sigint=False)
            running = asyncio.create_task(runner.run(worker))
            for _ in range(100):
                if server.active:
                    break
                await asyncio.sleep(0.05)
            pcm16 = np.round(speech * 32767).astype(np.int16)
            start = time.monotonic()
            for i, at in enumerate(range(0, pcm16.size, FRAME)):
                await worker.queue_frame(InputAudioRawFrame(audio=pcm16[at:at + FRAME].tobytes(), sample_rate=RATE,
                                                            num_channels=1))
                await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))
            await asyncio.sleep(1.0)
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, 20)
            return sink
    sink = run(main())
    assert not sink.errors, sink.errors
    # What Pipecat received, in the API's order (its EndFrame closes while Moshi may be speaking).
    done = check_responses(received, cut_by_close=True)
    assert done and sink.counts.get(LLMFullResponseEndFrame, 0) == len(done)
    assert sink.counts.get(TTSAudioRawFrame, 0) > 10 and sink.counts.get(TTSTextFrame, 0) > 0
