"""Injected speech (issue 22): a text Moshi says in its own voice, forced on its inner monologue.

The placement rule on the text stream's grid (`lm.inject`); the model loop forcing the tokens one a
tick on one row, checked against the official `LMGen` with the same text tokens forced (its text hook)
on the same user codes; `/v1/realtime` (the openai SDK and a raw client) and `/api/chat`'s inject
message through the running server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from openmoshi.lm.config import TEXT_END_PADDING_ID as EPAD, TEXT_PADDING_ID as PAD, lm_config_from_dict
from openmoshi.lm.inject import MAX_INJECT_CHARS, WORD_PAUSE, InjectError, inject_tokens, place_words
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.serving.loop import CancelInject, Frame, Inject, Join
from openmoshi.serving.server import MoshiServer, ServerConfig

from lm_utils import TINY_7B, make_official_lm, ours_from_official
from server_utils import tiny_models

TEXT = "hello world moshi speaks"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real SentencePiece model of the tiny LM's 100 text tokens (unknown 0, padding 3, as Moshi's)."""
    import sentencepiece

    from infer_utils import _tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok.model"
    _tokenizer(path, TINY_7B["text_card"])
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(path))
    return sp


# ----------------------------------------------------------------------------- placement


def test_placement_rule():
    """Each word: end-of-padding, its pieces one a frame, then WORD_PAUSE frames of padding."""
    assert WORD_PAUSE == 2
    assert place_words([[10, 11], [12], [13, 14, 15]]) == [
        EPAD, 10, 11, PAD, PAD, EPAD, 12, PAD, PAD, EPAD, 13, 14, 15, PAD, PAD]
    assert place_words([[7]], pause=0) == [EPAD, 7]
    assert place_words([[], [8]], pad=5, end_pad=6, pause=1) == [6, 8, 5]
    assert place_words([]) == []


def test_inject_tokens_of_a_text(tokenizer):
    """Words are tokenized one by one; unknown pieces (id 0, Moshi's end-of-padding id) are left out;
    empty, too long and unsayable texts are refused."""
    cfg = lm_config_from_dict(TINY_7B)
    words = [tokenizer.encode(w) for w in TEXT.split()]
    assert all(words) and all(0 not in w and PAD not in w for w in words)
    assert inject_tokens(tokenizer, "  " + TEXT.replace(" ", "\n ") + " ", cfg) == place_words(words)
    assert inject_tokens(tokenizer, "hello \u2603 world", cfg) == place_words([words[0], words[1]])  # unknown: out
    for bad, match in (("", "empty"), ("   ", "empty"), ("x" * (MAX_INJECT_CHARS + 1), "limit"),
                       ("\u2603 \u2604", "no word")):
        with pytest.raises(InjectError, match=match):
            inject_tokens(tokenizer, bad, cfg)
    small = lm_config_from_dict(dict(TINY_7B, text_card=10))
    with pytest.raises(InjectError, match="outside the model's 10 text tokens"):
        inject_tokens(tokenizer, TEXT, small)


# ----------------------------------------------------------------------------- the model loop


class Driver:
    """The server's model loop stepped by hand on the input clock: every LM step's user codes and
    forced tokens are recorded (what the official LMGen is fed), and every row's frames."""

    def __init__(self, lm, mimi, tokenizer, rows: int):
        self.server = MoshiServer(lm, mimi, tokenizer, ServerConfig(max_sessions=rows, static_dir=None,
                                                                    cuda_graph=False, clock="input"),
                                  SamplingConfig.greedy())
        self.loop = loop = self.server.loop
        self.events = []
        loop.sink = self.events.extend
        with torch.no_grad():
            loop.engine = loop.make_engine()
        self.steps = {i: [] for i in range(rows)}  # row -> (user codes [Ku], forced text or None) of its steps
        self.codes = {}  # seat -> [(text, audio codes [Q])] of its valid frames
        step = loop.engine.step

        def recording(codes, active=None, position=None, forced=None, embeddings=None, start=0):
            for k in range(codes.shape[0]):
                if active is None or active[k]:
                    text = None if forced is None or forced[k, 0] < 0 else int(forced[k, 0])
                    self.steps[start + k].append((codes[k].clone(), text))
            return step(codes, active, position, forced=forced, embeddings=embeddings, start=start)

        loop.engine.step = recording
        loop.recorder = lambda seat, pcm, text, audio, valid: valid and self.codes[seat].append((text, audio.copy()))
        self.seats = []

    def join(self, seeds=(1, 2)):
        seat = self.server.seats.open(len(self.seats))
        self.seats.append(seat)
        self.codes[seat] = []
        self.loop.submit(Join(seat, SamplingConfig.greedy(), seeds))
        return seat

    def tick(self, frames, spans=None):
        """One frame of each seat; `spans`: the phase groups to tick them in (None: one batch)."""
        with torch.no_grad():
            self.loop._apply_commands()
            for seat, pcm in zip(self.seats, frames):
                self.loop.push(seat, pcm[None])
            self.loop._tick(spans)
            self.loop._flush()

    def frames(self, seat) -> list[Frame]:
        return [e for e in self.events if isinstance(e, Frame) and e.seat is seat]


def official_run(official, steps) -> list[tuple[int, np.ndarray]]:
    """The official LMGen, greedy, on one row's recorded user codes, its text token replaced by the
    forced one where a step forced it (its text hook sees the token the depth transformer then reads
    and the cache keeps); its frames as (text, audio codes)."""
    from moshi.models.lm import LMGen

    t = [0]

    def force(text):
        forced = steps[t[0]][1]
        if forced is not None:
            text.fill_(forced)
        t[0] += 1

    gen = LMGen(official, use_sampling=False, on_text_hook=force)
    out = []
    with torch.no_grad(), gen.streaming(1):
        for codes, _ in steps:
            frame = gen.step(codes[None, :, None])
            if frame is not None:
                out.append((int(frame[0, 0, 0]), frame[0, 1:, 0].numpy()))
    return out


@pytest.mark.parametrize("spans", [None, [(0, 1), (1, 2)]], ids=["batch", "phase_groups"])
def test_injected_tokens_are_spoken_as_the_official_model_speaks_them(tokenizer, spans):
    """Two conversations, in one batch or in two phase groups (rows [0, 1) and [1, 2), each its own
    tick); the first is told to say a text at tick 5, and a second one queued behind it, the second
    conversation a text at tick 20. Each one's frames carry its injected tokens in order, exactly,
    tagged; every frame of both (text and audio codes) is the official LMGen's greedy generation on
    the same user codes with the same text tokens forced; a cancel drops the rest of the text it
    names."""
    official = make_official_lm(TINY_7B, seed=21)
    lm = ours_from_official(official, TINY_7B)
    _, mimi, _ = tiny_models(seed=22)
    d = Driver(lm, mimi, tokenizer, rows=2)
    a, b = d.join(), d.join((3, 4))
    first = inject_tokens(tokenizer, TEXT, lm.cfg)
    second = inject_tokens(tokenizer, "one two", lm.cfg)
    third = inject_tokens(tokenizer, "music science history weather", lm.cfg)
    rng = np.random.default_rng(5)
    speech = [(0.1 * rng.standard_normal((2, 1920))).astype(np.float32) for _ in range(50)]
    for t, pcm in enumerate(speech):
        if t == 5:
            d.loop.submit(Inject(a, tuple(first), 1))
            d.loop.submit(Inject(a, tuple(second), 2))
        if t == 40:
            d.loop.submit(Inject(a, tuple(third), 3))
        if t == 44:
            d.loop.submit(CancelInject(a, 3))
        if t == 20:
            d.loop.submit(Inject(b, tuple(second), 7))
        d.tick(pcm, spans)

    frames = d.frames(a)
    tagged = {tag: [f.token for f in frames if f.inject == tag] for tag in (1, 2, 3)}
    assert tagged[1] == first and tagged[2] == second
    assert 0 < len(tagged[3]) < len(third) and tagged[3] == third[:len(tagged[3])]
    order = [f.inject for f in frames if f.inject is not None]
    assert order == [1] * len(first) + [2] * len(second) + [3] * len(tagged[3])  # one after the other
    start = next(i for i, f in enumerate(frames) if f.inject == 1)
    assert start == 5  # tick 5's step: its frame is out at tick 6, the 6th frame (the first step answers nothing)
    assert [f.token for f in d.frames(b) if f.inject is not None] == second
    assert next(i for i, f in enumerate(d.frames(b)) if f.inject == 7) == 20
    assert sum(f.text is not None for f in frames if f.inject == 1) == len([t for t in first if t not in (0, 3)])

    for row, seat in enumerate((a, b)):
        ref = official_run(official, d.steps[row])
        ours = d.codes[seat]
        assert len(ours) == len(ref) == len(speech) - 1
        assert [t for t, _ in ours] == [t for t, _ in ref]
        assert np.array_equal(np.stack([c for _, c in ours]), np.stack([c for _, c in ref]))
    assert len({t for t, _ in d.codes[b]}) > 3, "degenerate test: the neighbour's text is not varied"


# ----------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def models(tokenizer):
    from realtime_utils import conversation_models

    return conversation_models(tokenizer)


def transcripts(raw: list[dict]) -> dict[str, str]:
    """response id -> its transcript, from the deltas (in order)."""
    out: dict[str, str] = {}
    for e in raw:
        if e["type"] == "response.output_audio_transcript.delta":
            out[e["response_id"]] = out.get(e["response_id"], "") + e["delta"]
    return out


def test_realtime_injection_with_the_openai_sdk(models):
    """On /v1/realtime with the official SDK: an assistant text item is said (a response whose
    transcript deltas are its pieces, in order, with audio); an item then a response.create with
    instructions, in a row, are two responses one after the other (the second echoing its metadata);
    response.cancel during a long text ends its response and drops the rest of the text; and a
    neighbour conversation on /api/chat hears what it hears alone (the input clock)."""
    from openai import AsyncOpenAI

    from chat_client import chat
    from realtime_utils import check_responses, check_with_pipecat
    from server_utils import serving

    neighbour_url = "?text_seed=5&audio_seed=6"
    long_text = "one two three four five six seven eight nine ten"

    async def session(server, http, raw):
        client = AsyncOpenAI(base_url=http + "/v1", api_key="anything")
        async with client.realtime.connect(model="gpt-realtime") as conn:
            parse = conn.parse_event
            conn.parse_event = lambda data: (raw.append(__import__("json").loads(data)), parse(data))[1]
            got = []

            async def reader():
                async for ev in conn:
                    got.append(ev)

            reading = asyncio.create_task(reader())

            async def wait(pred, timeout=20.0):
                start = len(raw) if not hasattr(wait, "at") else wait.at
                deadline = asyncio.get_running_loop().time() + timeout
                while asyncio.get_running_loop().time() < deadline:
                    for i in range(start, len(raw)):
                        if pred(raw[i]):
                            wait.at = i + 1
                            return raw[i]
                    await asyncio.sleep(0.02)
                raise AssertionError(f"timed out; last events: {[e['type'] for e in raw[-10:]]}")

            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await wait(lambda e: e["type"] == "session.updated")
            say = lambda text: {"type": "message", "role": "assistant",  # noqa: E731
                                "content": [{"type": "output_text", "text": text}]}
            # (Moshi may also speak its own words in between: those are responses too.)
            await conn.conversation.item.create(item=say(TEXT))
            await wait(lambda e: e["type"] == "conversation.item.added" and e["item"]["role"] == "assistant")
            r1 = (await wait(lambda e: e.get("delta") == " speaks"))["response_id"]
            await wait(lambda e: e["type"] == "response.done" and e["response"]["id"] == r1)

            await conn.conversation.item.create(item=say("one two"))
            await conn.response.create(response={"instructions": "music science", "metadata": {"client_event_id": "x"}})
            r3 = await wait(lambda e: e["type"] == "response.created" and e["response"]["metadata"] is not None)
            at = wait.at - 1  # r3's response.created: the response that ended right before it said "one two"
            r2 = next(e for e in raw[at::-1] if e["type"] == "response.done")["response"]["id"]
            await wait(lambda e: e["type"] == "response.done" and e["response"]["id"] == r3["response"]["id"])

            await conn.conversation.item.create(item=say(long_text))
            r4 = (await wait(lambda e: e.get("delta") == " two"))["response_id"]
            await conn.response.cancel()
            await wait(lambda e: e["type"] == "response.done" and e["response"]["id"] == r4)
            await asyncio.sleep(0.5)  # the cancel reaches the model loop at its next tick
            queued = [list(r.injected) for r in server.loop.rows if r is not None]
            await asyncio.sleep(1.5)
            reading.cancel()
            return (r1, r2, r3, r4), queued, got

    async def main():
        async with serving(models, max_sessions=2, clock="input") as (server, url, http):
            alone = await chat(url + neighbour_url, 4.0, drain=30, unanswered=1)
        async with serving(models, max_sessions=2, clock="input") as (server, url, http):
            raw = []
            neighbour = asyncio.create_task(chat(url + neighbour_url, 4.0, drain=30, unanswered=1))
            out = await session(server, http, raw)
            beside = await neighbour
        return alone, beside, raw, out

    alone, beside, raw, ((r1, r2, r3, r4), queued, got) = asyncio.run(main())
    assert [e["type"] for e in raw] == [e.type for e in got]  # the SDK read every event
    check_responses(raw, cut_by_close=True)
    check_with_pipecat(raw)  # every event, the injected responses' too, parses with Pipecat's models
    said = transcripts(raw)
    assert said[r1].startswith(TEXT), said[r1]
    assert said[r2] == "one two"  # ended by the next text's first frame
    assert r3["response"]["metadata"] == {"client_event_id": "x"}
    assert said[r3["response"]["id"]].startswith("music science")
    done = {e["response"]["id"]: e["response"] for e in raw if e["type"] == "response.done"}
    assert done[r4]["status"] == "cancelled" and long_text.startswith(said[r4]) and "ten" not in said[r4]
    assert queued and all(q == [] for q in queued)  # the rest of the long text was dropped
    audio = [e for e in raw if e["type"] == "response.output_audio.delta" and e["response_id"] == r1]
    assert len(audio) >= len(inject_tokens(models[2], TEXT, models[0].cfg)) - 1
    assert alone.texts and beside.texts == alone.texts and not beside.errors


def test_livekit_generate_reply_says_its_instructions(models):
    """LiveKit Agents' OpenAI realtime plugin: `generate_reply(instructions=...)` (what an agent's own
    LLM answers through) sends response.create with them; Moshi says them: the generation LiveKit
    gets is that response, whose transcript deltas start with the text, with audio."""
    import aiohttp
    from livekit import rtc
    from livekit.plugins.openai.realtime import RealtimeModel

    from realtime_utils import check_with_pipecat
    from server_utils import serving

    async def main():
        async with serving(models, max_sessions=1) as (server, url, http):
            async with aiohttp.ClientSession() as hs:
                session = RealtimeModel(api_key="x", base_url=http + "/v1", http_session=hs,
                                        turn_detection=None).session()
                events, errors = [], []
                session.on("openai_server_event_received", events.append)
                session.on("error", errors.append)
                silence = np.zeros(480, "<i2").tobytes()
                feeding = asyncio.create_task(feed(session, rtc.AudioFrame(silence, 24000, 1, 480)))
                generation = await asyncio.wait_for(session.generate_reply(instructions=TEXT), 30)
                for _ in range(200):
                    if any(e["type"] == "response.done" and e["response"]["id"] == generation.response_id
                           for e in events):
                        break
                    await asyncio.sleep(0.05)
                feeding.cancel()
                await session.aclose()
                return generation, events, errors

    async def feed(session, frame):
        while True:  # a microphone: 20 ms of silence every 20 ms
            session.push_audio(frame)
            await asyncio.sleep(0.02)

    generation, events, errors = asyncio.run(main())
    assert not errors, errors
    check_with_pipecat(events)
    said = transcripts(events)
    assert said[generation.response_id].startswith(TEXT), said
    assert any(e["type"] == "response.output_audio.delta" and e["response_id"] == generation.response_id
               for e in events)


def test_chat_inject_message(models):
    """/api/chat's inject message (kind 7): the model says the text, its pieces come back as text
    messages in order; a bad one (not UTF-8, empty, too long, nothing the tokenizer can say) gets an
    error message and the conversation goes on (audio still answered)."""
    import aiohttp
    import sphn

    from openmoshi.serving import protocol
    from server_utils import serving

    async def main():
        async with serving(models, max_sessions=1, clock="input") as (server, url, _http):
            writer = sphn.OpusStreamWriter(24000)
            got = []
            async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
                assert (await ws.receive(timeout=10)).data[:1] == b"\x00"

                async def receive():
                    async for msg in ws:
                        got.append((msg.data[0], bytes(msg.data[1:])))

                reading = asyncio.create_task(receive())
                bad = [b"\x07\xff\xfe", b"\x07", b"\x07   ", b"\x07" + b"a" * (protocol.MAX_INJECT_CHARS + 1),
                       protocol.encode_inject("\u2603")]
                for i in range(60):
                    if i == 3:
                        await ws.send_bytes(protocol.encode_inject(TEXT))
                    if i == 5:
                        for message in bad:
                            await ws.send_bytes(message)
                    page = writer.append_pcm(np.zeros(1920, np.float32))
                    if page:
                        await ws.send_bytes(b"\x01" + page)
                    await asyncio.sleep(0.08)
                await asyncio.sleep(0.5)
                reading.cancel()
            return got

    got = asyncio.run(main())
    texts = "".join(p.decode() for k, p in got if k == protocol.KIND_TEXT)
    errors = [p.decode() for k, p in got if k == protocol.KIND_ERROR]
    assert " " + TEXT in texts, texts
    assert len(errors) == 5, errors
    assert "not valid UTF-8" in errors[0] and "no text to say" in errors[1] and "no text to say" in errors[2]
    assert "more than the limit" in errors[3] and "cannot say this text" in errors[4]
    last_error = max(i for i, (k, _) in enumerate(got) if k == protocol.KIND_ERROR)
    assert sum(k == protocol.KIND_AUDIO for k, _ in got[last_error:]) > 20  # the conversation went on
    assert protocol.MAX_INJECT_CHARS == MAX_INJECT_CHARS


def test_a_row_in_its_prompt_phase_is_injected_into_once_ready(tmp_path):
    """PersonaPlex: a text injected while the row runs its persona prompt waits for the prompt's end:
    the conversation is the same as one whose text was injected at its Ready (greedy), and its
    first step after the prompt forces the text's first token."""
    from infer_utils import MOSHI, make_checkpoint
    from openmoshi.lm.persona import build_prompt
    from openmoshi.loading.model import load_model
    from openmoshi.loading.resolve import resolve_files
    from openmoshi.serving.loop import Ready

    make_checkpoint(tmp_path / "model", "moshi", seed=4, lm_kwargs=dict(MOSHI, dep_q=16, context=200),
                    small_mimi=True)
    model = load_model(resolve_files(str(tmp_path / "model")), "cpu", torch.float32)
    prompt = build_prompt(model.lm.cfg, None, model.tokenizer.encode("you are moshi"))
    tokens = tuple(inject_tokens(model.tokenizer, "hello world", model.lm.cfg))
    rng = np.random.default_rng(9)
    speech = [(0.1 * rng.standard_normal((1, 1920))).astype(np.float32) for _ in range(len(tokens) + 6)]

    def conversation(early: bool):
        d = Driver(model.lm, model.mimi, model.tokenizer, rows=1)
        seat = d.server.seats.open(0)
        d.seats.append(seat)
        d.codes[seat] = []
        d.loop.submit(Join(seat, SamplingConfig.greedy(), (1, 2), prompt))
        if early:
            d.loop.submit(Inject(seat, tokens, 1))
        prompt_ticks = 0
        while not any(isinstance(e, Ready) for e in d.events):
            d.tick([])
            prompt_ticks += 1
        if not early:
            d.loop.submit(Inject(seat, tokens, 1))
        for pcm in speech:
            d.tick(pcm)
        return prompt_ticks, d.frames(seat), d.codes[seat]

    (ticks_a, frames_a, codes_a), (ticks_b, frames_b, codes_b) = conversation(True), conversation(False)
    assert ticks_a == ticks_b == prompt.frames
    assert [f.token for f in frames_a if f.inject == 1] == list(tokens)
    # The first frame out after Ready is the prompt's last step's (sampled); the text starts at the next.
    assert frames_a[0].inject is None and frames_a[1].inject == 1 and frames_a[1].token == tokens[0]
    assert [(f.token, f.inject) for f in frames_a] == [(f.token, f.inject) for f in frames_b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(codes_a, codes_b)) and len(codes_a) == len(speech)
