"""The wire protocol: encoding, parsing, and the parser's behaviour on arbitrary bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openmoshi.serving import protocol as p


def test_kind_constants_match_the_official_protocol():
    assert (p.KIND_HANDSHAKE, p.KIND_AUDIO, p.KIND_TEXT, p.KIND_CONTROL, p.KIND_METADATA,
            p.KIND_ERROR, p.KIND_PING) == (0, 1, 2, 3, 4, 5, 6)
    assert (p.CONTROL_START, p.CONTROL_END_TURN, p.CONTROL_PAUSE, p.CONTROL_RESTART) == (0, 1, 2, 3)


def test_encodings():
    assert p.encode_handshake() == b"\x00"
    assert p.encode_handshake(1, 2) == b"\x00\x01\x00\x00\x00\x02\x00\x00\x00"
    assert p.encode_audio(b"OggS..") == b"\x01OggS.."
    assert p.encode_text(" héllo") == b"\x02" + " héllo".encode()
    assert p.encode_control(p.CONTROL_RESTART) == b"\x03\x03"
    assert json.loads(p.encode_metadata({"a": [1, 2]})[1:]) == {"a": [1, 2]}
    assert p.encode_error("busy") == b"\x05busy"
    assert p.encode_ping() == b"\x06"
    with pytest.raises(ValueError):
        p.encode_control(9)


@pytest.mark.parametrize("message", [
    p.Message(p.KIND_HANDSHAKE, b""), p.Message(p.KIND_HANDSHAKE, bytes(8)),
    p.Message(p.KIND_AUDIO, b"OggS\x00\x02"), p.Message(p.KIND_TEXT, " mot"),
    p.Message(p.KIND_CONTROL, p.CONTROL_PAUSE), p.Message(p.KIND_METADATA, {"text_temperature": 0.7}),
    p.Message(p.KIND_ERROR, "the server is busy"), p.Message(p.KIND_PING, b""),
])
def test_round_trip(message):
    assert p.parse(p.encode(message)) == message


def test_queue_position():
    data = p.encode_queue_position(2, 5)
    assert data[:1] == b"\x04" and json.loads(data[1:]) == {"queue_position": 2, "queue_length": 5}
    assert p.queue_position(p.parse(data)) == (2, 5)
    for other in (p.encode_metadata({"queue_position": 1}), p.encode_metadata([1, 2]),
                  p.encode_metadata({"queue_position": True, "queue_length": 1}), p.encode_text("queue_position")):
        assert p.queue_position(p.parse(other)) is None


def test_handshake_versions():
    assert p.handshake_versions(p.parse(p.encode_handshake())) is None
    assert p.handshake_versions(p.parse(p.encode_handshake(3, 7))) == (3, 7)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"), (b"\x08", "unknown message kind 8"),
    (b"\x07", "no text to say"), (b"\x07 \n", "no text to say"), (b"\x07\xff", "inject message is not valid UTF-8"),
    (b"\x07" + b"a" * (p.MAX_INJECT_CHARS + 1), "more than the limit of 2000"), (b"\xff\x00", "unknown message kind 255"),
    (b"\x02\xc3\x28", "not valid UTF-8"), (b"\x05\xff", "not valid UTF-8"),
    (b"\x03", "exactly 1 payload byte"), (b"\x03\x00\x00", "exactly 1 payload byte"),
    (b"\x03\x04", "unknown control code 4"), (b"\x04{", "not valid JSON"), (b"\x04\xff", "UTF-8"),
    (b"\x00\x01\x02", "handshake payload"), (b"\x01" + bytes(p.MAX_MESSAGE_BYTES), "larger than the limit"),
    ("text", "expected a binary message"),
])
def test_parse_errors(data, match):
    with pytest.raises(p.ProtocolError, match=match):
        p.parse(data)


def test_deeply_nested_metadata_is_an_error_not_a_crash():
    with pytest.raises(p.ProtocolError):
        p.parse(b"\x04" + b"[" * 100_000 + b"]" * 100_000)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_parse_random_bytes_never_crashes(data):
    try:
        msg = p.parse(data)
    except p.ProtocolError as e:
        assert str(e)
        return
    assert msg.kind == data[0] and msg.kind in p.KIND_NAMES
    assert p.parse(p.encode(msg)) == msg  # what parses re-encodes to something equivalent


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.KIND_NAMES)), st.binary(max_size=32))
def test_parse_known_kinds_with_random_payloads(kind, payload):
    try:
        msg = p.parse(bytes([kind]) + payload)
    except p.ProtocolError:
        return
    assert msg.kind == kind


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_text_round_trip(text):
    assert p.parse(p.encode_text(text)).data == text
    assert p.parse(p.encode_error(text)).data == text


@given(st.integers(min_value=1, max_value=64), st.binary(max_size=80))
def test_size_limit(limit, data):
    data = b"\x01" + data
    if len(data) > limit:
        with pytest.raises(p.ProtocolError, match="larger than"):
            p.parse(data, max_bytes=limit)
    else:
        assert p.parse(data, max_bytes=limit).data == data[1:]


def test_metadata_is_strict_json():
    with pytest.raises(p.ProtocolError, match="NaN"):
        p.parse(b"\x04NaN")
