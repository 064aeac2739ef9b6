"""The OpenAI-Realtime-compatible endpoint `/v1/realtime`: its pieces alone (G.711, resampling, the
model's and the user's turns, client events), then the server on loopback with tiny random models,
driven by the clients voice agents use (the official `openai` SDK, LiveKit Agents, Pipecat) and by
a raw websocket client that checks every event against Pipecat's own event models."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import aiohttp
import numpy as np
import pytest
import torch

from openmoshi.lm.config import TEXT_PADDING_ID
from openmoshi.serving.realtime import events as E
from openmoshi.serving.realtime import g711
from openmoshi.serving.realtime.formats import InputDecoder, OutputEncoder, Resampler, parse_format
from openmoshi.serving.realtime.turns import END_FRAMES, ENDED, PREFIX_FRAMES, START_FRAMES, STARTED, ModelTurns
from openmoshi.serving.realtime.vad import SpeechDetector, TurnDetection

from server_utils import serving, tiny_models

FRAME, RATE = 1920, 24000
DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models():
    """Tiny random models shaped like Moshi in conversation: its text stream mostly padding (a word
    in ~1 frame of 6, so stretches of speech start and end), its audio near silence (-65 dBFS) when
    it says nothing, so that the text decides the turns as the real model's does."""
    torch.set_num_threads(1)
    lm, mimi, tok = tiny_models()
    head = torch.nn.Linear(lm.text_linear.in_features, lm.text_linear.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.text_linear.weight)
        head.bias.zero_()
        head.bias[TEXT_PADDING_ID] = 4.0
        last = mimi.decoder.model[-1].conv.conv
        last.weight.mul_(1e-3)
        last.bias.mul_(1e-3)
    lm.text_linear = head
    return lm, mimi, tok


@pytest.fixture(scope="module")
def speech():
    """A few seconds of real speech (espeak-ng) at 24 kHz, then 1.5 s of silence."""
    from openmoshi.audio import resample

    raw = subprocess.run(["espeak-ng", "--stdout", "-s", "150", "Hello Moshi. How are you today? "
                          "Tell me a story about the sea."], check=True, capture_output=True).stdout
    # espeak-ng writes a 44-byte WAV header, then 16-bit mono at 22050 Hz.
    pcm = np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0
    pcm = resample(torch.from_numpy(pcm), 22050, RATE).numpy()
    return np.concatenate([pcm, np.zeros(int(1.5 * RATE), np.float32)])


def run(coro):
    return asyncio.run(coro)


def pcm16_b64(pcm: np.ndarray) -> str:
    return base64.b64encode(np.clip(pcm * 32768, -32768, 32767).astype("<i2").tobytes()).decode()


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def realtime_url(http: str, model: str = "moshi") -> str:
    return http.replace("http://", "ws://") + f"/v1/realtime?model={model}"


class Raw:
    """A websocket client written from the API's description: sends JSON events, records every
    server event with its arrival time."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self.times: list[float] = []
        self.new = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))
                self.times.append(time.monotonic())
                self.new.set()

    async def send(self, **event):
        await self.ws.send_str(json.dumps(event))

    async def stream(self, pcm: np.ndarray, encode=pcm16_b64, chunk: int = FRAME):
        """Appends `pcm` in real time, one 80 ms chunk at a time."""
        start = time.monotonic()
        for i, at in enumerate(range(0, pcm.size, chunk)):
            await self.send(type="input_audio_buffer.append", audio=encode(pcm[at:at + chunk]))
            await asyncio.sleep(max(0.0, start + (i + 1) * chunk / RATE - time.monotonic()))

    async def wait_for(self, predicate, timeout: float = 10.0, start: int = 0) -> int:
        """Index of the first event from `start` on for which `predicate(event)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.events)):
                if predicate(self.events[i]):
                    return i
            start = len(self.events)
            self.new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such event within {timeout} s; got {[e['type'] for e in self.events][-20:]}")
            try:
                await asyncio.wait_for(self.new.wait(), left)
            except asyncio.TimeoutError:
                pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def check_responses(events: list[dict]) -> list[dict]:
    """Asserts the API's order of each response's events, that responses never overlap and that
    every delta belongs to the item its response announced; returns the `response.done` events."""
    order = ["response.created", "response.output_item.added", "conversation.item.added",
             "response.content_part.added", "deltas", "response.output_audio.done",
             "response.output_audio_transcript.done", "response.content_part.done", "response.output_item.done",
             "conversation.item.done", "response.done"]
    active, stage, item, done, transcript = None, None, None, [], []
    for ev in events:
        kind = ev["type"]
        if kind in ("conversation.item.added", "conversation.item.done") and ev["item"].get("role") != "assistant":
            continue  # the user's items interleave freely
        if kind not in order and kind not in DELTAS:
            continue
        if kind == "response.created":
            assert active is None, f"response {ev['response']['id']} started while {active} was active"
            active, stage = ev["response"]["id"], kind
            transcript = []
            continue
        assert active is not None, f"{kind} outside a response"
        step = "deltas" if kind in DELTAS else kind
        assert order.index(step) in (order.index(stage), order.index(stage) + 1), f"{kind} after {stage}"
        stage = step
        if kind == "response.output_item.added":
            assert ev["response_id"] == active
            item = ev["item"]["id"]
        elif kind == "conversation.item.added":
            assert ev["item"]["id"] == item
        elif kind in DELTAS or kind.startswith("response.content_part") or kind.startswith("response.output_audio"):
            assert ev["response_id"] == active and ev["item_id"] == item, "a delta of an item never announced"
            if kind == "response.output_audio_transcript.delta":
                transcript.append(ev["delta"])
            if kind == "response.output_audio_transcript.done":
                assert ev["transcript"] == "".join(transcript)
        elif kind == "response.done":
            assert ev["response"]["id"] == active and ev["response"]["output"][0]["id"] == item
            usage = ev["response"]["usage"]
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            done.append(ev)
            active, stage = None, None
    return done


def check_with_pipecat(events: list[dict]) -> None:
    """Every event we sent parses with Pipecat's own pydantic models (an unknown type or a missing
    field ends a Pipecat session), and has a unique event_id."""
    from pipecat.services.openai.realtime.events import parse_server_event

    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    for e in events:
        assert parse_server_event(json.dumps(e)) is not None, f"Pipecat does not know {e['type']}"


# ----------------------------------------------------------------------------- the pieces


def test_g711_matches_the_reference_coder():
    audioop = pytest.importorskip("audioop")  # the standard library's G.711 (Python < 3.13, or audioop-lts)
    x = np.arange(-32768, 32768, dtype=np.int16)
    codes = bytes(range(256))
    for law, enc, dec in ((g711.ULAW, audioop.lin2ulaw, audioop.ulaw2lin), (g711.ALAW, audioop.lin2alaw,
                                                                            audioop.alaw2lin)):
        assert g711.encode(x, law) == enc(x.tobytes(), 2)
        assert g711.decode(codes, law).tobytes() == dec(codes, 2)


def test_resampler_streams_and_filters():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8000).astype(np.float32)
    whole = Resampler(24000, 8000)(x)
    r = Resampler(24000, 8000)
    pieces = np.concatenate([r(c) for c in np.array_split(x, [1, 7, 1920, 1921, 5000])])
    assert whole.size == pieces.size == 8000 // 3 + 1 and np.allclose(whole, pieces, atol=1e-5)
    t = np.arange(RATE) / RATE
    # 440 Hz survives 24 -> 8 -> 24 kHz (after the filters' delay); 6 kHz, above 8 kHz's Nyquist
    # frequency, is removed instead of folding onto 2 kHz as plain decimation would fold it.
    low = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    back = Resampler(8000, 24000)(Resampler(24000, 8000)(low))
    assert min(np.abs(back[2000 + lag:20000 + lag] - low[2000:20000]).max() for lag in range(200)) < 1e-3
    high = Resampler(24000, 8000)(np.sin(2 * np.pi * 6000 * t).astype(np.float32))
    assert np.sqrt(np.mean(high[200:] ** 2)) < 1e-3


def test_formats_round_trip():
    assert parse_format("g711_ulaw") == parse_format({"type": "audio/pcmu"})
    assert parse_format({"type": "audio/pcm", "rate": 24000}).to_dict() == {"type": "audio/pcm", "rate": 24000}
    for bad in ({"type": "audio/pcm", "rate": 16000}, "mp3", {"type": "audio/wav"}, 3):
        with pytest.raises(ValueError):
            parse_format(bad)
    pcm = tone(0.5)
    out = OutputEncoder(parse_format({"type": "audio/pcmu"}))(pcm)
    assert len(out) == pcm.size // 3  # one byte per 8 kHz sample
    back = InputDecoder(parse_format({"type": "audio/pcmu"}))(out)
    assert back.size == pcm.size
    assert min(np.abs(back[2000 + lag:10000 + lag] - pcm[2000:10000]).max() for lag in range(200)) < 0.02
    odd = InputDecoder(parse_format("pcm16"))
    data = (np.arange(10, dtype="<i2") * 100).tobytes()
    assert np.array_equal(np.concatenate([odd(data[:3]), odd(data[3:])]) * 32768, np.arange(10) * 100)


def test_model_turns_thresholds():
    quiet, loud = np.full(FRAME, 1e-4, np.float32), tone(FRAME / RATE)
    turns = ModelTurns()
    assert [turns.step(quiet, None)[0] for _ in range(20)] == [None] * 20  # silence: no response
    # A word starts a response at once; the frame before it comes with it.
    transition, frames = turns.step(quiet, " hello")
    assert transition == STARTED and len(frames) == 1 + PREFIX_FRAMES and frames[-1][1] == " hello"
    # Word-less frames without sound: the response ends on the END_FRAMES-th one, a word resets the count.
    got = [turns.step(quiet, None)[0] for _ in range(END_FRAMES - 1)] + [turns.step(quiet, "x")[0]]
    got += [turns.step(quiet, None)[0] for _ in range(END_FRAMES)]
    assert got == [None] * (2 * END_FRAMES - 1) + [ENDED]
    # Sound without words: START_FRAMES loud frames start one, and loud frames keep it going.
    assert turns.step(quiet, None)[0] is None
    steps = [turns.step(loud, None) for _ in range(START_FRAMES + 20)]
    assert [t for t, _ in steps] == [None] * (START_FRAMES - 1) + [STARTED] + [None] * 20
    onset = steps[START_FRAMES - 1][1]  # the response begins with its first loud frame, after the prefix
    assert len(onset) == PREFIX_FRAMES + START_FRAMES and all(p is loud for p, _ in onset[PREFIX_FRAMES:])
    assert [turns.step(quiet, None)[0] for _ in range(END_FRAMES)][-1] == ENDED
    # A single loud frame (a click) does not.
    assert turns.step(loud, None)[0] is None and turns.step(quiet, None)[0] is None


def test_speech_detector_on_real_speech(speech):
    torch.set_num_threads(1)
    detector = SpeechDetector(TurnDetection(silence_duration_ms=500))
    assert detector.model is not None, "silero-vad is a test dependency"
    got = []
    for i in range(0, speech.size, FRAME):
        got += detector.feed(speech[i:i + FRAME])
    voiced = np.nonzero(np.abs(speech) > 0.02)[0] / RATE * 1000
    kinds = [k for k, _ in got]
    assert kinds[0] == "speech_started" and kinds[-1] == "speech_stopped"
    assert kinds == ["speech_started", "speech_stopped"] * (len(kinds) // 2)
    start, end = got[0][1], got[-1][1]
    assert voiced[0] - 300 - 100 <= start <= voiced[0]  # prefix padding of 300 ms before the onset
    assert voiced[-1] - 200 <= end <= voiced[-1] + 300
    assert not any(k for k, _ in SpeechDetector().feed(np.zeros(RATE, np.float32)))


def test_client_events_are_checked():
    assert E.parse_client_event('{"type": "transcription_session.update", "session": {}}')["type"] == "session.update"
    for data, code in (("{", "invalid_json"), ("[]", "invalid_json"), ('{"no": 1}', "missing_required_parameter"),
                       ('{"type": "nope"}', "invalid_value"), (b"\x00", "invalid_json"),
                       ('{"type": "response.create", "event_id": 5}', "invalid_type")):
        with pytest.raises(E.EventError) as e:
            E.parse_client_event(data)
        assert e.value.code == code
    with pytest.raises(E.EventError):
        E.audio_payload({"audio": "not base64!"})


def test_session_cancel_mutes_the_stretch_and_a_slow_client_loses_only_audio():
    """The session's own rules, frame by frame (no model, no network): after response.cancel the
    rest of the model's stretch of speech is not sent, and the next stretch is a new response; a
    client that does not read loses its oldest audio deltas and nothing else."""
    from types import SimpleNamespace

    from openmoshi.serving.metrics import Metrics
    from openmoshi.serving.realtime.session import RealtimeConversation
    from openmoshi.serving.server import ServerConfig

    quiet = np.full(FRAME, 1e-4, np.float32)

    async def main():
        server = SimpleNamespace(config=ServerConfig(outbox_frames=1000), metrics=Metrics())
        conv = RealtimeConversation(server, ws=None, peer="test")
        conv._deliver(quiet, " one")
        for _ in range(3):
            conv._deliver(quiet, None)
        await conv._on_response_cancel({"type": "response.cancel"})
        cancelled = len(conv.outbox)
        for i in range(30):  # the stretch goes on: a word every 5 frames
            conv._deliver(quiet, " more" if i % 5 == 0 else None)
        muted = len(conv.outbox)
        for _ in range(END_FRAMES):  # the stretch ends unheard ...
            conv._deliver(quiet, None)
        conv._deliver(quiet, " next")  # ... and the next one is a new response
        events = list(conv.outbox)

        slow = RealtimeConversation(SimpleNamespace(config=ServerConfig(outbox_frames=5), metrics=Metrics()),
                                    ws=None, peer="slow")
        slow._deliver(quiet, " a")
        for _ in range(40):
            slow._deliver(quiet, " b")
        return events, cancelled, muted, list(slow.outbox), slow.dropped
    events, cancelled, muted, slow, dropped = run(main())
    done = check_responses(events)
    assert [d["response"]["status"] for d in done] == ["cancelled"]
    assert events[cancelled - 1]["type"] == "response.done" and muted == cancelled
    assert [e["type"] for e in events[cancelled:]][:1] == ["response.created"] and len(events) > cancelled
    kinds = [e["type"] for e in slow]
    assert kinds.count("response.output_audio.delta") == 5 and dropped == 36
    assert kinds.count("response.output_audio_transcript.delta") == 41  # every word kept
    assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                         "response.content_part.added"]


# ----------------------------------------------------------------------------- the server


@pytest.mark.slow
def test_openai_sdk_session(models, speech):
    """The official SDK, as its users write it: speech in; VAD events, audio and transcript deltas,
    and completed responses out."""
    from openai import AsyncOpenAI

    async def main():
        async with serving(models, max_sessions=2) as (server, _, http):
            client = AsyncOpenAI(base_url=http + "/v1", api_key="anything")
            got = []
            async with client.realtime.connect(model="gpt-realtime") as conn:
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
            return got
    got = run(main())
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
    done = check_responses(events)
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
                    if abs(float(server.batcher.gen.temp[0]) - 0.4) < 1e-6:
                        break
                    await asyncio.sleep(0.05)
                return c.events, u, b, float(server.batcher.gen.temp[0]), float(server.batcher.gen.temp_text[0])
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

                async def watch():
                    while True:
                        rows.append(server.metrics.batch_rows)
                        await asyncio.sleep(0.05)

                watching = asyncio.create_task(watch())
                other = asyncio.create_task(chat(url, 3.0))
                streaming = asyncio.create_task(c.stream(tone(4.0)))
                await asyncio.sleep(1.0)
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
    assert max(rows) == 2, "the two conversations never shared a batched step"
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
                got = {"generations": 0, "frames": 0, "text": [], "errors": [], "speech": []}

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
    assert got["speech"][:2] == ["started", "stopped"]
    assert got["generations"] >= 2 and got["frames"] > 0 and "".join(got["text"]).strip()
    assert reply.user_initiated  # its response.create's metadata came back in response.created


@pytest.mark.slow
def test_pipecat_service(models, speech):
    """Pipecat's OpenAIRealtimeLLMService in a pipeline, as its users configure it (a base URL):
    the user's speech in, Moshi's audio and words out, and no error (its errors end a session)."""
    from pipecat.frames.frames import (EndFrame, ErrorFrame, InputAudioRawFrame, LLMFullResponseEndFrame,
                                       TTSAudioRawFrame, TTSTextFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
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

    async def main():
        async with serving(models, max_sessions=1) as (server, _, http):
            llm = OpenAIRealtimeLLMService(api_key="x", base_url=http.replace("http://", "ws://") + "/v1/realtime")
            sink = Sink()
            worker = PipelineWorker(Pipeline([llm, sink]), params=PipelineParams(audio_in_sample_rate=RATE,
                                                                                  audio_out_sample_rate=RATE))
            runner = WorkerRunner(handle_sigint=False)
            running = asyncio.create_task(runner.run(worker))
            for _ in range(100):
                if server.batcher.active:
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
    assert sink.counts.get(TTSAudioRawFrame, 0) > 10 and sink.counts.get(TTSTextFrame, 0) > 0
    assert sink.counts.get(LLMFullResponseEndFrame, 0) >= 1
