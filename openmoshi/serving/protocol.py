"""The binary websocket protocol of Moshi's `/api/chat` route, compatible with the official clients.

Every websocket message is binary: the first byte is the kind, the rest is the payload.

    kind  name       direction          payload
    0     handshake  server -> client   empty, or u32 protocol version + u32 model version (LE)
    1     audio      both               Ogg pages of 24 kHz mono Opus
    2     text       server -> client   one UTF-8 text piece
    3     control    both               one byte: start 0, endTurn 1, pause 2, restart 3
    4     metadata   both               UTF-8 JSON
    5     error      server -> client   UTF-8 message
    6     ping       both               empty (anything after the kind byte is ignored)
    7     inject     client -> server   UTF-8 text for the model to say in its own voice (openmoshi's
                                        own kind, not in the official protocol; 1..MAX_INJECT_CHARS
                                        characters, see `lm.inject`)

The server sends the handshake once it is ready to take audio. A client that has to wait for a
free conversation slot first gets metadata `{"queue_position": k, "queue_length": n}` every few
seconds (`encode_queue_position`). The official web client throws on kinds it does not know and
closes after 10 s without any server message, so the server only sends these kinds. `parse` never
raises anything but `ProtocolError` on untrusted bytes.

Inject (kind 7) is openmoshi's extension for voice agents that steer the conversation: the model
says the text, forced on its inner monologue, while it goes on listening; the text it says comes
back as usual, as text messages. An inject message that is not UTF-8, empty, or too long gets an
error message, and the conversation goes on. Official clients never send it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

# Message kinds (first byte).
KIND_HANDSHAKE = 0
KIND_AUDIO = 1
KIND_TEXT = 2
KIND_CONTROL = 3
KIND_METADATA = 4
KIND_ERROR = 5
KIND_PING = 6
KIND_INJECT = 7  # openmoshi's own: text for the model to say (client to server)
KIND_NAMES = {
    KIND_HANDSHAKE: "handshake", KIND_AUDIO: "audio", KIND_TEXT: "text", KIND_CONTROL: "control",
    KIND_METADATA: "metadata", KIND_ERROR: "error", KIND_PING: "ping", KIND_INJECT: "inject",
}
MAX_INJECT_CHARS = 2000  # longest text an inject message may carry (`lm.inject.MAX_INJECT_CHARS`)

# Control codes (the single payload byte of a control message).
CONTROL_START = 0
CONTROL_END_TURN = 1
CONTROL_PAUSE = 2
CONTROL_RESTART = 3
CONTROL_NAMES = {
    CONTROL_START: "start", CONTROL_END_TURN: "endTurn", CONTROL_PAUSE: "pause",
    CONTROL_RESTART: "restart",
}

# Keys of the metadata sent to a client waiting for a conversation slot, before the handshake.
QUEUE_POSITION = "queue_position"  # 1: the next to start
QUEUE_LENGTH = "queue_length"  # clients waiting, this one included

# Versions sent in the long handshake form (the Rust server's); the Python server sends no payload.
PROTOCOL_VERSION = 0
MODEL_VERSION = 0
_HANDSHAKE_STRUCT = struct.Struct("<II")

# Largest message accepted, kind byte included. One Ogg page of 80 ms Opus is a few hundred bytes;
# 1 MiB leaves room for a client that batches seconds of audio and still bounds memory.
MAX_MESSAGE_BYTES = 1 << 20


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says why, for the error reply."""


@dataclass(frozen=True)
class Message:
    """One parsed message. `data` is bytes for audio/ping/handshake, str for text/error/inject,
    an int control code for control, and the decoded JSON value for metadata."""

    kind: int
    data: Any = b""

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]


# ----------------------------------------------------------------------------- encoding


def encode_handshake(protocol_version: int | None = None, model_version: int = MODEL_VERSION) -> bytes:
    """The handshake; with `protocol_version` given, the long form with two u32 versions."""
    if protocol_version is None:
        return bytes([KIND_HANDSHAKE])
    return bytes([KIND_HANDSHAKE]) + _HANDSHAKE_STRUCT.pack(protocol_version, model_version)


def encode_audio(ogg: bytes) -> bytes:
    return bytes([KIND_AUDIO]) + bytes(ogg)


def encode_text(text: str) -> bytes:
    return bytes([KIND_TEXT]) + text.encode("utf-8")


def encode_control(code: int) -> bytes:
    if code not in CONTROL_NAMES:
        raise ValueError(f"unknown control code {code}")
    return bytes([KIND_CONTROL, code])


def encode_metadata(value: Any) -> bytes:
    return bytes([KIND_METADATA]) + json.dumps(value, separators=(",", ":")).encode("utf-8")


def encode_queue_position(position: int, length: int) -> bytes:
    """Metadata telling a waiting client its place in line: `position` (1 is next) of `length`."""
    return encode_metadata({QUEUE_POSITION: position, QUEUE_LENGTH: length})


def encode_error(text: str) -> bytes:
    return bytes([KIND_ERROR]) + text.encode("utf-8")


def encode_ping() -> bytes:
    return bytes([KIND_PING])


def encode_inject(text: str) -> bytes:
    return bytes([KIND_INJECT]) + text.encode("utf-8")


def encode(message: Message) -> bytes:
    """Inverse of `parse`."""
    kind, data = message.kind, message.data
    if kind == KIND_HANDSHAKE:
        return bytes([KIND_HANDSHAKE]) + bytes(data)
    if kind == KIND_AUDIO:
        return encode_audio(data)
    if kind == KIND_TEXT:
        return encode_text(data)
    if kind == KIND_CONTROL:
        return encode_control(data)
    if kind == KIND_METADATA:
        return encode_metadata(data)
    if kind == KIND_ERROR:
        return encode_error(data)
    if kind == KIND_PING:
        return bytes([KIND_PING]) + bytes(data)
    if kind == KIND_INJECT:
        return encode_inject(data)
    raise ValueError(f"unknown message kind {kind}")


# ----------------------------------------------------------------------------- parsing


def _utf8(payload: bytes, kind: int) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{KIND_NAMES[kind]} message is not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse(message: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parses one websocket message; raises `ProtocolError` on anything malformed."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(message).__name__}")
    message = bytes(message)
    if len(message) == 0:
        raise ProtocolError("empty message")
    if len(message) > max_bytes:
        raise ProtocolError(f"message of {len(message)} bytes is larger than the limit of {max_bytes}")
    kind, payload = message[0], message[1:]
    if kind == KIND_AUDIO or kind == KIND_PING:
        return Message(kind, payload)
    if kind == KIND_HANDSHAKE:
        if len(payload) not in (0, _HANDSHAKE_STRUCT.size):
            raise ProtocolError(f"handshake payload must be 0 or {_HANDSHAKE_STRUCT.size} bytes, got {len(payload)}")
        return Message(kind, payload)
    if kind == KIND_TEXT or kind == KIND_ERROR:
        return Message(kind, _utf8(payload, kind))
    if kind == KIND_CONTROL:
        if len(payload) != 1:
            raise ProtocolError(f"control message must have exactly 1 payload byte, got {len(payload)}")
        if payload[0] not in CONTROL_NAMES:
            raise ProtocolError(f"unknown control code {payload[0]}")
        return Message(kind, payload[0])
    if kind == KIND_INJECT:
        text = _utf8(payload, kind)
        if not text.strip():
            raise ProtocolError("inject message has no text to say")
        if len(text) > MAX_INJECT_CHARS:
            raise ProtocolError(f"inject message has {len(text)} characters, more than the limit of {MAX_INJECT_CHARS}")
        return Message(kind, text)
    if kind == KIND_METADATA:
        text = _utf8(payload, kind)
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"metadata message is not valid JSON: {e}") from None
        return Message(kind, value)
    raise ProtocolError(f"unknown message kind {kind}")


def queue_position(message: Message) -> tuple[int, int] | None:
    """(position, length) of a queue-position metadata message; None for any other message."""
    data = message.data
    if message.kind != KIND_METADATA or not isinstance(data, dict):
        return None
    position, length = data.get(QUEUE_POSITION), data.get(QUEUE_LENGTH)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (position, length)):
        return None
    return position, length


def handshake_versions(message: Message) -> tuple[int, int] | None:
    """(protocol version, model version) of a long handshake, None for the short one."""
    if message.kind != KIND_HANDSHAKE or not message.data:
        return None
    return _HANDSHAKE_STRUCT.unpack(message.data)
