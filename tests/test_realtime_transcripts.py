"""The user's words on `/v1/realtime` (`serve --stt-model`): a tiny random Kyutai STT beside a tiny
random Moshi in one process; espeak-ng speech in through the clients voice agents use; the
`conversation.item.input_audio_transcription.delta` / `.completed` events carry exactly the words
`openmoshi stt` finds in the same audio (random weights: the words themselves are compared)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import numpy as np
import pytest
import torch

from realtime_utils import (FRAME, RATE, Raw, check_responses, check_with_pipecat, models,  # noqa: F401 (fixtures)
                            pcm16_b64, realtime_url, run, speech)
from server_utils import listening_socket
from stt_utils import make_stt

from openmoshi.engine.speed import SpeedConfig, choose
from openmoshi.inference.stt import transcribe
from openmoshi.lm.stt import WordEvent, WordTracker
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.hosting import ModelServers
from openmoshi.serving.realtime.transcription import MAX_OPEN_STEPS
from openmoshi.serving.server import MoshiServer, ServerConfig

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stt_model(tmp_path_factory):
    folder = make_stt(tmp_path_factory.mktemp("realtime_stt") / "ckpt", seed=5)
    return load_model(resolve_files(str(folder)), "cpu", torch.float32)


@contextlib.asynccontextmanager
async def hosting(models, stt_model=None, stt_sessions: int = 2, **config):
    """Moshi (and the STT model, when given) behind one app: `(moshi, stt, http_url)`."""
    config = dict(dict(max_sessions=2, static_dir=None), **config)
    moshi = MoshiServer(*models, ServerConfig(**config))
    stt = None
    if stt_model is not None:
        stt = MoshiServer.for_model(stt_model, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                                    ServerConfig(**dict(config, max_sessions=stt_sessions)))
    runner, sock = Runner(ModelServers([moshi] + ([stt] if stt else []))), listening_socket()
    await runner.start(sock)
    try:
        yield moshi, stt, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.stop()


def heard(pcm: np.ndarray) -> np.ndarray:
    """What the server decodes of `pcm16_b64(pcm)`."""
    return np.clip(pcm * 32768, -32768, 32767).astype("<i2").astype(np.float32) / 32768.0


def item_words(stt_model, pcm: np.ndarray) -> list[str]:
    """The words of an item spanning all of `pcm`, from `openmoshi stt`'s text tokens on it (then
    silence, as the server adds when the client stops after its commit), by the rule of
    `realtime.transcription`: words that start in the item and whose first piece comes by the step
    that completes it (the item's frames read, plus the delay, and no word open that started in it)."""
    result = transcribe(stt_model, [torch.from_numpy(heard(pcm))[None]], tail_seconds=3.0)[0]
    timing, cfg = result.timing, stt_model.lm.cfg
    words = WordTracker(timing, cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
    needed = timing.prefix_frames + -(-pcm.size // FRAME) + 1 + timing.delay_tokens
    out = []
    for step, token in enumerate(result.tokens, 1):
        out += [stt_model.tokenizer.decode(list(e.tokens)) for e in words.push(token)
                if isinstance(e, WordEvent) and round(e.start * RATE) < pcm.size]
        if step >= needed and not (words.word and round(words.last_stop * RATE) < pcm.size):
            assert step < needed + MAX_OPEN_STEPS  # the rule's cap is not what ended it
            return out
    raise AssertionError("the item never completes within the tail")


def transcripts(events: list[dict]) -> dict[str, tuple[str, str | None]]:
    """{item_id: (its deltas joined, its completed transcript or None)}."""
    out: dict[str, list] = {}
    for e in events:
        if e["type"] == DELTA:
            out.setdefault(e["item_id"], ["", None])[0] += e["delta"]
        elif e["type"] == COMPLETED:
            out.setdefault(e["item_id"], ["", None])[1] = e["transcript"]
    return {k: tuple(v) for k, v in out.items()}


def test_openai_sdk_transcripts_equal_openmoshi_stt(models, stt_model, speech):
    """Manual commits (turn detection off), transcription on in the GA shape: one item per commit;
    its deltas joined and its completed transcript are `openmoshi stt`'s words on that audio; the
    STT stream leaves its seat when the session ends."""
    from openai import AsyncOpenAI

    pcm = speech  # ~4 s of speech, 1.5 s of silence

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            client = AsyncOpenAI(base_url=http + "/v1", api_key="anything")
            got, raw = [], []
            async with client.realtime.connect(model="gpt-realtime") as conn:
                parse = conn.parse_event
                conn.parse_event = lambda data: (raw.append(json.loads(data)), parse(data))[1]

                async def reader():
                    async for ev in conn:
                        got.append(ev)

                reading = asyncio.create_task(reader())
                await conn.session.update(session={"type": "realtime", "audio": {"input": {
                    "turn_detection": None, "transcription": {"model": "gpt-4o-transcribe", "language": "en"}}}})
                for at in range(0, pcm.size, FRAME):  # faster than real time: the STT stream keeps it all
                    await conn.input_audio_buffer.append(audio=pcm16_b64(pcm[at:at + FRAME]))
                    await asyncio.sleep(0.01)
                await conn.input_audio_buffer.commit()
                for _ in range(300):
                    if any(e.type == COMPLETED for e in got):
                        break
                    await asyncio.sleep(0.1)
                active = stt.active
                reading.cancel()
            for _ in range(100):
                if not stt.active:
                    break
                await asyncio.sleep(0.05)
            return got, raw, active, stt.active

    got, raw, active_during, active_after = run(main())
    assert [e["type"] for e in raw] == [e.type for e in got]
    check_with_pipecat(raw)
    check_responses(raw, cut_by_close=True)  # and the transcription events' own order
    updated = next(e for e in raw if e["type"] == "session.updated")
    assert "transcription" not in updated["ignored"]
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
    committed = [e["item_id"] for e in raw if e["type"] == "input_audio_buffer.committed"]
    items = transcripts(raw)
    assert list(items) == committed
    deltas, transcript = items[committed[0]]
    words = item_words(stt_model, pcm)
    assert len(words) >= 2
    assert deltas == transcript == " ".join(words)
    completed = next(e for e in got if e.type == COMPLETED)  # the SDK's own model of the event
    assert completed.transcript == transcript and completed.content_index == 0
    assert active_during == 1 and active_after == 0


def test_server_vad_items_and_word_times(models, stt_model, speech):
    """Server VAD commits the items as the user speaks (audio in real time, beta setting name):
    each word goes to one item, in order, with its `openmoshi stt` start time; every item committed
    gets its completed transcript."""
    pcm = np.concatenate([speech, np.zeros(RATE, np.float32)])

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                await c.send(type="session.update", session={"input_audio_transcription": {"model": "whisper-1"},
                                                             "turn_detection": {"type": "server_vad",
                                                                                "silence_duration_ms": 200}})
                await c.wait_for(lambda e: e["type"] == "session.updated")
                await c.stream(pcm)
                committed = [e["item_id"] for e in c.of("input_audio_buffer.committed")]
                for item in committed:
                    await c.wait_for(lambda e: e["type"] == COMPLETED and e["item_id"] == item, 20)
                return c.events

    events = run(main())
    check_with_pipecat(events)
    check_responses(events, cut_by_close=True)
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) >= 2  # short pauses end turns
    items = transcripts(events)
    assert [k for k in items if items[k][1] is not None] == committed
    assert all(d == t for d, t in items.values())
    solo = transcribe(stt_model, [torch.from_numpy(heard(pcm))[None]])[0].words
    told = [(e["delta"].strip(), e["start_time"]) for e in events if e["type"] == DELTA]
    assert len(told) >= 2
    assert told == [(w.text, w.start) for w in solo[:len(told)]]  # the audio came whole: no silence added


def test_no_free_stt_seat_is_one_error_and_the_conversation_goes_on(models, stt_model, speech):
    """One STT seat, no waiting line: the second session that asks for transcription gets one
    error event, no transcription events, and its conversation with Moshi goes on."""
    async def main():
        async with hosting(models, stt_model, stt_sessions=1, queue_size=0) as (moshi, stt, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as w1, \
                    s.ws_connect(realtime_url(http)) as w2:
                a, b = Raw(w1), Raw(w2)
                setting = {"audio": {"input": {"transcription": {"model": "x"}, "turn_detection": None}}}
                for c in (a, b):
                    await c.wait_for(lambda e: e["type"] == "session.created")
                await a.send(type="session.update", session=setting)
                await a.wait_for(lambda e: e["type"] == "session.updated")
                for _ in range(100):
                    if stt.active:
                        break
                    await asyncio.sleep(0.05)
                await b.send(type="session.update", session=setting)
                await b.wait_for(lambda e: e["type"] == "error", 10)
                await asyncio.gather(a.stream(speech[:2 * RATE]), b.stream(speech[:2 * RATE]))
                for c in (a, b):
                    await c.send(type="input_audio_buffer.commit")
                await a.wait_for(lambda e: e["type"] == COMPLETED, 20)
                await b.wait_for(lambda e: e["type"] == "input_audio_buffer.committed")
                await asyncio.sleep(1.0)
                return a.events, b.events

    a, b = run(main())
    for events in (a, b):
        check_with_pipecat(events)
        check_responses(events, cut_by_close=True)
    errors = [e for e in b if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "transcription_unavailable"
    assert "busy" in errors[0]["error"]["message"]
    assert not [e for e in b if e["type"].startswith("conversation.item.input_audio_transcription")]
    assert [e for e in b if e["type"] == "response.output_audio.delta"]  # Moshi went on
    assert not [e for e in a if e["type"] == "error"] and transcripts(a)


def test_transcription_off_and_a_host_without_stt(models, stt_model):
    """Transcription off (never asked, or null): no STT seat taken, no transcription events. A host
    without an STT model accepts the setting, says `ignored: ["transcription"]` in
    session.updated (its session shows transcription null) and sends none either."""
    from realtime_utils import tone

    async def session(http, setting):
        async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
            c = Raw(ws)
            await c.wait_for(lambda e: e["type"] == "session.created")
            await c.send(type="session.update", session=setting)
            await c.wait_for(lambda e: e["type"] == "session.updated")
            await c.stream(tone(1.0))
            await c.send(type="input_audio_buffer.commit")
            await c.wait_for(lambda e: e["type"] == "input_audio_buffer.committed")
            await asyncio.sleep(1.0)
            return c.events

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            off = await session(http, {"audio": {"input": {"transcription": None, "turn_detection": None}}})
            seats = stt.active
        async with hosting(models) as (moshi, _, http):
            without = await session(http, {"input_audio_transcription": {"model": "whisper-1"},
                                           "turn_detection": None})
        return off, seats, without

    off, seats, without = run(main())
    assert seats == 0
    for events in (off, without):
        check_with_pipecat(events)
        assert not [e for e in events if e["type"].startswith("conversation.item.input_audio_transcription")]
        assert not [e for e in events if e["type"] == "error"]
    updated = next(e for e in without if e["type"] == "session.updated")
    assert "transcription" in updated["ignored"] and updated["session"]["audio"]["input"]["transcription"] is None
    assert "transcription" not in next(e for e in off if e["type"] == "session.updated")["ignored"]


def test_words_to_items_rules():
    """The Transcriber's rules alone (no model): words by start time into uncompleted items, a
    late word to the span after, cleared audio to none, completion held by an open word, times
    less the silence it added, and a failure as one error plus `.failed` for waiting items."""
    from types import SimpleNamespace

    from openmoshi.lm.stt import SttTiming
    from openmoshi.serving.realtime.transcription import Transcriber

    server = SimpleNamespace(stt=SttTiming(delay_tokens=2), tokenizer=None, text_ids=(3, 0),
                             config=ServerConfig(static_dir=None))
    sent, items = [], {"a": {"role": "user", "content": [{"type": "input_audio", "transcript": None}]}}
    protocol = SimpleNamespace(emit=sent.append, items=items, session=SimpleNamespace(peer="p"))
    t = Transcriber(server, protocol, origin=1000)
    kinds = lambda: [(e["type"].rsplit(".", 1)[-1], e.get("item_id"), e.get("delta", e.get("transcript")))
                     for e in sent if e["type"] != "error"]

    t.push(np.zeros(3 * FRAME, np.float32))
    t.on_word("early", 0.08)  # before its item exists: kept
    t.commit("a")  # [0, 3 frames): needs 3 frames + 1 + delay 2 = 6 steps
    t.on_word("two", 0.16)
    t.on_step(6, open_start=0.2)  # a word opened inside "a": it waits
    assert kinds() == [("delta", "a", "early"), ("delta", "a", " two")]
    t.on_word("three", 0.2)
    t.on_step(7, None)
    assert kinds()[-2:] == [("delta", "a", " three"), ("completed", "a", "early two three")]
    assert items["a"]["content"][0]["transcript"] == "early two three"
    assert sent[0]["start_time"] == round((1000 + 0.08 * RATE) / RATE, 3)

    t.on_word("late", 0.2)  # starts inside "a", which is complete: the next span takes it
    t.inserted.append((t.samples, FRAME))  # a frame of silence the Transcriber added after "a"
    t.push(np.zeros(FRAME, np.float32))
    t.push(np.zeros(FRAME, np.float32))  # then the client's audio
    t.commit("b")  # [3, 5 frames)
    t.on_word("after", (5 * FRAME - 240) / RATE)
    assert kinds()[-2:] == [("delta", "b", "late"), ("delta", "b", " after")]
    assert sent[-1]["start_time"] == round((1000 + 5 * FRAME - 240 - FRAME) / RATE, 3)

    t.push(np.zeros(FRAME, np.float32))
    t.on_word("cleared", 5.5 * FRAME / RATE)
    t.clear()
    t.push(np.zeros(FRAME, np.float32))
    t.commit("c")
    assert kinds()[-1] == ("delta", "b", " after")  # nothing for "c" yet, "cleared" went nowhere

    t.on_message("error", "the server is busy")
    t.on_message("error", "again")  # one error only
    t.commit("d")
    errors = [e for e in sent if e["type"] == "error"]
    assert len(errors) == 1 and "busy" in errors[0]["error"]["message"]
    assert kinds()[-2:] == [("failed", "b", None), ("failed", "c", None)]


@pytest.mark.slow
def test_livekit_agents_gets_the_transcript(models, stt_model, speech):
    """LiveKit Agents' OpenAI realtime plugin with `input_audio_transcription` and turn detection
    off: its audio frames in, `commit_audio()`, and its `input_audio_transcription_completed`
    events (partial ones from the deltas, then the final) carry the item's words."""
    from livekit import rtc
    from livekit.plugins.openai.realtime import RealtimeModel
    from openai.types import realtime

    pcm = speech[:-RATE // 2]
    pcm16 = np.clip(pcm * 32768, -32768, 32767).astype("<i2")

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            async with aiohttp.ClientSession() as hs:
                model = RealtimeModel(api_key="x", base_url=http + "/v1", http_session=hs, turn_detection=None,
                                      input_audio_transcription=realtime.AudioTranscription(model="whisper-1"))
                session = model.session()
                got = {"transcripts": [], "errors": [], "events": []}
                session.on("input_audio_transcription_completed", got["transcripts"].append)
                session.on("error", got["errors"].append)
                session.on("openai_server_event_received", got["events"].append)
                for _ in range(100):
                    if stt.active:
                        break
                    await asyncio.sleep(0.05)
                start = time.monotonic()
                for i, at in enumerate(range(0, pcm16.size, FRAME)):
                    chunk = pcm16[at:at + FRAME]
                    session.push_audio(rtc.AudioFrame(chunk.tobytes(), RATE, 1, chunk.size))
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
                session.commit_audio()
                for _ in range(300):
                    if any(t.is_final for t in got["transcripts"]):
                        break
                    await asyncio.sleep(0.1)
                await session.aclose()
                return got

    got = run(main())
    assert not got["errors"], got["errors"]
    check_with_pipecat(got["events"])
    check_responses(got["events"], cut_by_close=True)
    final = [t for t in got["transcripts"] if t.is_final]
    words = item_words(stt_model, pcm)
    assert len(words) >= 2 and [t.transcript for t in final] == [" ".join(words)]
    partial = [t.transcript for t in got["transcripts"] if not t.is_final]
    assert partial[-1] == final[0].transcript and len(partial) == len(words)  # one partial per word


@pytest.mark.slow
def test_pipecat_gets_transcription_frames(models, stt_model, speech, monkeypatch):
    """Pipecat's OpenAIRealtimeLLMService with transcription in its session properties (server
    VAD): it pushes one TranscriptionFrame per completed item, upstream, with no error; the items'
    words are `openmoshi stt`'s, in order."""
    from pipecat.frames.frames import EndFrame, ErrorFrame, InputAudioRawFrame, TranscriptionFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    class Catch(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.transcripts, self.errors = [], []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TranscriptionFrame):
                self.transcripts.append(frame.text)
            if isinstance(frame, ErrorFrame):
                self.errors.append(frame.error)
            await self.push_frame(frame, direction)

    pcm = np.concatenate([speech, np.zeros(RATE // 2, np.float32)])
    pcm16 = np.clip(pcm * 32768, -32768, 32767).astype("<i2")

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            properties = events.SessionProperties(audio=events.AudioConfiguration(input=events.AudioInput(
                transcription=events.InputAudioTranscription(model="whisper-1"),
                turn_detection=events.TurnDetection(silence_duration_ms=200))))
            llm = OpenAIRealtimeLLMService(api_key="x", base_url=http.replace("http://", "ws://") + "/v1/realtime",
                                           settings=OpenAIRealtimeLLMService.Settings(session_properties=properties))
            before, after = Catch(), Catch()
            worker = PipelineWorker(Pipeline([before, llm, after]),
                                    params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))
            runner = WorkerRunner(handle_sigint=False)
            running = asyncio.create_task(runner.run(worker))
            for _ in range(100):
                if stt.active:
                    break
                await asyncio.sleep(0.05)
            start = time.monotonic()
            for i, at in enumerate(range(0, pcm16.size, FRAME)):
                await worker.queue_frame(InputAudioRawFrame(audio=pcm16[at:at + FRAME].tobytes(), sample_rate=RATE,
                                                            num_channels=1))
                await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))
            await asyncio.sleep(2.0)
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, 20)
            return before, after, stt.active

    received = []  # Pipecat parses every event it receives with this function: keep the JSON too
    parse = events.parse_server_event
    monkeypatch.setattr(events, "parse_server_event", lambda data: (received.append(json.loads(data)), parse(data))[1])
    before, after, active = run(main())
    assert not before.errors and not after.errors, before.errors + after.errors
    check_responses(received, cut_by_close=True)
    completed = [e["transcript"] for e in received if e["type"] == COMPLETED]
    assert len(completed) >= 2 and before.transcripts == completed
    solo = transcribe(stt_model, [torch.from_numpy(heard(pcm))[None]])[0].words
    told = " ".join(completed).split(" ")
    assert told == " ".join(w.text for w in solo).split(" ")[:len(told)]
    assert active == 0  # Pipecat's session ended: the STT stream left its seat


@pytest.fixture(scope="module")
def pausing_stt(stt_model):
    """The STT model with its third pause head sharpened: random weights otherwise never reach
    the 0.6 that ends a turn; sharpened, some steps of speech do."""
    import copy

    model = copy.deepcopy(stt_model)
    with torch.no_grad():
        model.lm.extra_heads[2].weight[0] *= 10.0
    return model


def test_semantic_vad_ends_turns_on_the_stt_pause_head(models, pausing_stt, speech):
    """semantic_vad with transcription on: the VAD starts the user's speech, the STT's pause head
    (`prs[2]` above 0.6, as Unmute) stops it, at the time of that step; the items still get their
    transcripts."""
    from openmoshi.serving.realtime.protocol import PAUSE_THRESHOLD

    async def main():
        async with hosting(models, pausing_stt) as (moshi, stt, http):
            async with aiohttp.ClientSession() as s, s.ws_connect(realtime_url(http)) as ws:
                c = Raw(ws)
                await c.wait_for(lambda e: e["type"] == "session.created")
                await c.send(type="session.update", session={"audio": {"input": {
                    "transcription": {"model": "x"}, "turn_detection": {"type": "semantic_vad"}}}})
                await c.wait_for(lambda e: e["type"] == "session.updated")
                await c.stream(speech)
                for item in [e["item_id"] for e in c.of("input_audio_buffer.committed")]:
                    await c.wait_for(lambda e: e["type"] == COMPLETED and e["item_id"] == item, 20)
                return c.events

    events = run(main())
    check_with_pipecat(events)
    check_responses(events, cut_by_close=True)
    result = transcribe(pausing_stt, [torch.from_numpy(heard(speech))[None]])[0]
    skip = result.timing.skip
    pauses = [(i + 1 - skip) * 80 for i, p in enumerate(result.prs) if p[2] > PAUSE_THRESHOLD and i + 1 >= skip]
    vad = [e for e in events if e["type"].startswith("input_audio_buffer.speech")]
    assert sum(e["type"].endswith("stopped") for e in vad) >= 2
    for started, stopped in zip(vad[::2], vad[1::2]):
        assert started["type"].endswith("started") and stopped["type"].endswith("stopped")
        heard_from = started["audio_start_ms"] + 300  # the prefix padding: where the VAD heard speech
        assert stopped["audio_end_ms"] in pauses and stopped["audio_end_ms"] > heard_from
        assert not [ms for ms in pauses if heard_from + 112 < ms < stopped["audio_end_ms"]]  # the first pause
    items = transcripts(events)
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [k for k in items if items[k][1] is not None] == [k for k in committed if k in items]
