"""Everything a client controls, generated (hypothesis strategies), and one case of each run against
a live server; shared by tests/test_server_fuzz.py (bounded) and benchmarks/fuzz_edge.py (long).

    query_cases()    the query string of /api/chat: any parameter, type, magnitude, repetition, encoding
    chat_messages()  control, metadata, ping, handshake and server-only kinds on a started conversation
    realtime_events() /v1/realtime client events with every field of any JSON type and magnitude

`run_query_case`, `run_chat_case` and `run_realtime_case` play one case and return what the
server did ("refused", "served", ...); `probe` is the normal conversation that must work after each.
"""

from __future__ import annotations

import asyncio
import base64
import json
import string
from urllib.parse import quote

import aiohttp
import numpy as np
import sphn
from hypothesis import strategies as st

FRAME, RATE = 1920, 24000
TIMEOUT = aiohttp.ClientTimeout(total=15)

CHAT_PARAMS = ["text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult", "repetition_penalty",
               "repetition_penalty_context", "text_seed", "audio_seed", "seed", "text_prompt", "voice_prompt",
               "worker_auth_id", "model", "unknown"]
NUMBERS = ["0", "-0", "1", "-1", "0.5", "1e39", "-1e39", "1e308", "1e309", "1e-45", "1e20", "1e400", "100.0", "1e0",
           "+3", ".5", "5.", "1_0", "0x10", " 1", "1 ", "nan", "NaN", "inf", "-Infinity", "\u0661\u0662", "\uff11",
           "9" * 40, str(2 ** 62), str(2 ** 63), str(2 ** 64), "256", "257", "1e3", "1e6", "1e7", "", "\x00", "%00"]


def _number_text():
    magnitude = st.builds("{}e{}".format, st.sampled_from(["1", "-1", "9.99", "3.4028236", "1.7976931348623157"]),
                          st.integers(-330, 330))  # every order of magnitude, float32's and float64's edges
    return st.one_of(st.sampled_from(NUMBERS), magnitude, st.floats().map(repr),
                     st.integers(-(10 ** 40), 10 ** 40).map(str))


def query_cases():
    """(query string, how it is sent): a list of (name, value) pairs percent-encoded in UTF-8 or
    Latin-1, or sent unencoded."""
    known = st.sampled_from(CHAT_PARAMS)
    name = st.one_of(known, known, known, st.text(string.ascii_letters + "_[]", min_size=1, max_size=12))
    value = st.one_of(_number_text(), _number_text(), st.text(max_size=30))
    pair = st.tuples(name, value)
    # One parameter alone reaches the model whenever it passes; several probe parsing and repetition.
    sampling = st.sampled_from(CHAT_PARAMS[:7])
    pairs = st.one_of(pair.map(lambda p: [p]), st.tuples(sampling, _number_text()).map(lambda p: [p]),
                      st.lists(pair, min_size=2, max_size=8))
    encoding = st.sampled_from(["utf-8", "latin-1", "raw"])
    return st.tuples(pairs, encoding).map(lambda c: _encode_query(*c))


def _encode_query(pairs, encoding: str) -> str:
    if encoding == "raw":
        return "&".join(f"{k}={v}" for k, v in pairs)
    return "&".join(f"{quote(k, safe='', encoding=encoding, errors='replace')}="
                    f"{quote(v, safe='', encoding=encoding, errors='replace')}" for k, v in pairs)


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30), st.floats(),
                        st.sampled_from([1e308, -1e308, 1e-320, 2 ** 63, -(2 ** 63)]), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)


def chat_messages():
    """Binary messages a started /api/chat conversation may receive, valid or not."""
    any_json = _json_values().map(lambda v: json.dumps(v).encode())
    payload = st.one_of(st.binary(max_size=40), any_json, st.text(max_size=40).map(str.encode))
    message = st.one_of(
        st.binary(min_size=1, max_size=2).map(lambda b: b"\x03" + b),  # control, any code
        payload.map(lambda p: b"\x04" + p),  # metadata
        st.binary(max_size=10).map(lambda p: b"\x06" + p),  # ping
        st.binary(max_size=10).map(lambda p: b"\x00" + p),  # handshake
        payload.map(lambda p: b"\x02" + p), payload.map(lambda p: b"\x05" + p),  # server-only kinds
        st.integers(7, 255).map(lambda k: bytes([k])), st.just(b""),
    )
    return st.lists(message, min_size=1, max_size=8)


REALTIME_TYPES = ["session.update", "transcription_session.update", "input_audio_buffer.append",
                  "input_audio_buffer.commit", "input_audio_buffer.clear", "conversation.item.create",
                  "conversation.item.truncate", "conversation.item.delete", "conversation.item.retrieve",
                  "response.create", "response.cancel"]


def realtime_events():
    """Client events: a known or unknown type, and every field the server reads set to any JSON value."""
    v = _json_values()
    fmt = st.one_of(v, st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"]),
                    st.fixed_dictionaries({"type": st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma"])},
                                          optional={"rate": v}))
    turn = st.one_of(v, st.fixed_dictionaries({}, optional={
        "type": st.one_of(v, st.sampled_from(["server_vad", "semantic_vad"])), "threshold": v,
        "prefix_padding_ms": v, "silence_duration_ms": v}))
    session = st.fixed_dictionaries({}, optional={
        "temperature": v, "voice": v, "instructions": v, "tools": v, "input_audio_format": fmt,
        "output_audio_format": fmt, "turn_detection": turn, "input_audio_transcription": v,
        "audio": st.fixed_dictionaries({}, optional={
            "input": st.fixed_dictionaries({}, optional={"format": fmt, "turn_detection": turn, "transcription": v,
                                                         "noise_reduction": v}),
            "output": st.fixed_dictionaries({}, optional={"format": fmt, "voice": v})})})
    audio = st.one_of(v, st.binary(max_size=4000).map(lambda b: base64.b64encode(b).decode()))
    item = st.one_of(v, st.fixed_dictionaries({"type": st.sampled_from(["message", "function_call",
                                                                         "function_call_output"])},
                                              optional={"id": v, "role": v, "content": v}))
    fields = st.fixed_dictionaries({}, optional={
        "session": st.one_of(session, v), "audio": audio, "item": item, "item_id": v, "audio_end_ms": v,
        "content_index": v, "previous_item_id": v, "response": st.one_of(v, st.fixed_dictionaries(
            {}, optional={"metadata": v, "instructions": v})), "response_id": v, "event_id": v})
    kind = st.one_of(st.sampled_from(REALTIME_TYPES), v)
    event = st.tuples(kind, fields).map(lambda c: json.dumps({"type": c[0], **c[1]}))
    raw = st.one_of(st.text(max_size=40), st.sampled_from(['{"type": "session.update", "session": {"temperature": NaN}}',
                                                           '{"type": "response.create", "response": Infinity}', "[]",
                                                           "null", '{"type": 1e999}']))
    return st.lists(st.one_of(event, raw), min_size=1, max_size=6)


# ----------------------------------------------------------------------------- running cases


def opus_pages(frames: int = 6) -> list[bytes]:
    writer = sphn.OpusStreamWriter(RATE)
    t = np.arange(frames * FRAME) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    pages = [writer.append_pcm(pcm[i * FRAME:(i + 1) * FRAME]) for i in range(frames)]
    return [b"\x01" + p for p in pages if p]


async def _first(ws) -> aiohttp.WSMessage:
    return await ws.receive(timeout=10)


async def probe(url: str, http: str) -> None:
    """The normal conversation that must still be served: handshake, then audio back for audio sent;
    and /health 200."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.ws_connect(url) as ws:
            first = await _first(ws)
            while first.type == aiohttp.WSMsgType.BINARY and first.data[:1] == b"\x04":  # a place in line
                first = await _first(ws)
            assert first.type == aiohttp.WSMsgType.BINARY and first.data[:1] == b"\x00", first
            for page in opus_pages():
                await ws.send_bytes(page)
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                assert msg.data[:1] != b"\x05", msg.data
                if msg.data[:1] == b"\x01":
                    break
        async with s.get(http + "/health") as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "ok", body


async def run_query_case(url: str, query: str) -> str:
    """Opens a conversation with this query; 'refused' (error + close), 'served' (audio back) or
    'rejected' (the HTTP layer refused the URL itself)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        try:
            ws = await s.ws_connect(f"{url}?{query}")
        except (aiohttp.WSServerHandshakeError, aiohttp.ClientResponseError, ValueError, aiohttp.InvalidURL):
            return "rejected"
        async with ws:
            first = await _first(ws)
            if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] == b"\x05":
                return "refused"
            assert first.data[:1] == b"\x00", first
            for page in opus_pages():
                await ws.send_bytes(page)
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return "closed"
                if msg.data[:1] == b"\x01":
                    return "served"


async def run_chat_case(url: str, messages: list[bytes]) -> str:
    """Sends the messages on a started conversation; it must go on (audio back after them)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.ws_connect(url) as ws:
            assert (await _first(ws)).data[:1] == b"\x00"
            for m in messages:
                await ws.send_bytes(m)
            for page in opus_pages():
                await ws.send_bytes(page)
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY, (msg, messages)
                if msg.data[:1] == b"\x01":
                    return "served"


async def run_realtime_case(url: str, events: list[str]) -> str:
    """Sends the events on a started Realtime session; it must go on: a valid event afterwards is
    answered."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.ws_connect(url) as ws:
            first = json.loads((await _first(ws)).data)
            assert first["type"] == "session.created", first
            for e in events:
                await ws.send_str(e)
            await ws.send_str(json.dumps({"type": "input_audio_buffer.clear", "event_id": "probe"}))
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT, (msg, events)
                event = json.loads(msg.data)
                if event["type"] == "input_audio_buffer.cleared":
                    return "served"
