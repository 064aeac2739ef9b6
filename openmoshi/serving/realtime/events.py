"""The OpenAI Realtime API's events (GA names and shapes), as plain dicts; no web framework here.

Server events are built by the functions below; every one has an `event_id`. Client events are
read by `parse_client_event`, which accepts the GA names and the retired beta ones, and raises
`EventError` (an `error` event's type, code, message and param) for malformed ones.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets

# Client event types we handle (GA names; the beta API used the same names for these).
CLIENT_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "conversation.item.delete",
    "conversation.item.retrieve", "response.create", "response.cancel",
)
# Retired beta names a client may still send -> their GA name.
BETA_CLIENT_EVENTS = {"transcription_session.update": "session.update"}
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one event (base64 audio of ~5 min at 24 kHz fits)

_counter = itertools.count()


def new_id(prefix: str) -> str:
    """`prefix_` + 20 characters, unique in this process (OpenAI's ids look alike)."""
    return f"{prefix}_{secrets.token_hex(6)}{next(_counter):08x}"


class EventError(ValueError):
    """A client event we cannot act on; becomes an `error` event, and the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


def server_event(type_: str, **fields) -> dict:
    return {"type": type_, "event_id": new_id("event"), **fields}


def error(message: str, code: str, param: str | None = None, client_event_id: str | None = None,
          kind: str = "invalid_request_error") -> dict:
    return server_event("error", error={"type": kind, "code": code, "message": message, "param": param,
                                        "event_id": client_event_id})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # NaN and Infinity: Python's json takes them, JSON does not


def number(value, param: str, low: float, high: float, integer: bool = False) -> int | float:
    """A client's JSON number checked at the edge: a number (not a bool or a string), integral
    when `integer`, within [low, high]; EventError quoting the value otherwise."""
    shown = json.dumps(value)[:40]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError(f"'{param}' must be a number, got {shown}", "invalid_type", param)
    if integer and isinstance(value, float) and not value.is_integer():
        raise EventError(f"'{param}' must be an integer, got {shown}", "invalid_type", param)
    if not low <= value <= high:  # also refuses inf (a JSON 1e999)
        raise EventError(f"'{param}' must be in [{low:g}, {high:g}], got {shown}", "invalid_value", param)
    return int(value) if integer else float(value)


def parse_client_event(data: str | bytes) -> dict:
    """One client event as a dict with a known `type` (beta names mapped to GA ones)."""
    if isinstance(data, bytes):
        raise EventError("binary websocket frames are not part of the Realtime API: send JSON text",
                         "invalid_json")
    if len(data) > MAX_EVENT_BYTES:
        raise EventError(f"an event is limited to {MAX_EVENT_BYTES} bytes", "event_too_large")
    try:
        event = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise EventError(f"the event is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(event, dict):
        raise EventError("an event must be a JSON object", "invalid_json")
    kind = event.get("type")
    if not isinstance(kind, str):
        raise EventError("the event has no string 'type'", "missing_required_parameter", "type")
    kind = BETA_CLIENT_EVENTS.get(kind, kind)
    if kind not in CLIENT_EVENTS:
        raise EventError(f"Invalid value: {kind[:100]!r}. Supported values are: {', '.join(CLIENT_EVENTS)}.",
                         "invalid_value", "type")
    event["type"] = kind
    if "event_id" in event and not isinstance(event["event_id"], str):
        raise EventError("'event_id' must be a string", "invalid_type", "event_id")
    return event


def audio_payload(event: dict) -> bytes:
    """The decoded `audio` of an `input_audio_buffer.append`."""
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise EventError("input_audio_buffer.append needs 'audio', a base64 string", "missing_required_parameter",
                         "audio")
    try:
        return base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise EventError("'audio' is not valid base64", "invalid_value", "audio") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assistant_item(item_id: str, status: str, transcript: str | None) -> dict:
    """The conversation item of a response: one assistant message with one audio part."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_audio", "transcript": transcript}]}


def user_item(item_id: str) -> dict:
    """The conversation item of a committed stretch of user audio (no transcription: Moshi has none)."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": None}]}


def usage(text_tokens: int, audio_frames: int, input_frames: int) -> dict:
    """Tokens as Moshi counts them: per 80 ms frame, one text token and one audio frame out (its
    codebooks counted once), and one audio frame in (the user's codebooks)."""
    output = text_tokens + audio_frames
    return {"total_tokens": output + input_frames, "input_tokens": input_frames, "output_tokens": output,
            "input_token_details": {"text_tokens": 0, "audio_tokens": input_frames, "image_tokens": 0,
                                    "cached_tokens": 0,
                                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0}},
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_frames}}
