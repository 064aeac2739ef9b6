"""The order of a Realtime API session's server events, checked strictly (used by the /v1/realtime
tests on what their clients received; its own tests: test_realtime_order.py).

A response's events come in the API's documented order, each stage once (only the deltas repeat;
the deltas and `conversation.item.done` may be absent):

    response.created -> response.output_item.added -> conversation.item.added
    -> response.content_part.added -> deltas (audio, transcript)
    -> response.output_audio.done + response.output_audio_transcript.done (either order)
    -> response.content_part.done -> response.output_item.done -> (conversation.item.done) -> response.done

Session events (VAD, the user's items, errors, settings) may come between any two of them. The
transcription of a user's input audio item (`conversation.item.input_audio_transcription.*`) comes
at any time after that item's `conversation.item.added`: deltas, then at most one `completed`
(its transcript the deltas joined) or `failed`, and nothing of the item's transcription after that.
Responses never overlap, nothing of a response follows its `response.done`, and every event type
is one this checker knows: a server that invents one, or sends a type it does not model, fails.
"""

from __future__ import annotations

DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta")
OUTPUT_DONE = ("response.output_audio.done", "response.output_audio_transcript.done")
# A response's stages: (event types, may be absent, may repeat).
STAGES = (
    (("response.created",), False, False),
    (("response.output_item.added",), False, False),
    (("conversation.item.added",), False, False),
    (("response.content_part.added",), False, False),
    (DELTAS, True, True),  # a response cancelled at once may have none: its queued audio is dropped
    (OUTPUT_DONE, False, False),
    (("response.content_part.done",), False, False),
    (("response.output_item.done",), False, False),
    (("conversation.item.done",), True, False),
    (("response.done",), False, False),
)
STAGE_OF = {kind: i for i, (kinds, _, _) in enumerate(STAGES) for kind in kinds}
# Events of the session, outside any response (conversation.item.* of other items than the
# response's own: the user's speech, items the client created).
SESSION_EVENTS = frozenset((
    "session.created", "session.updated", "error",
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
    "input_audio_buffer.cleared", "conversation.item.added", "conversation.item.done",
    "conversation.item.truncated", "conversation.item.deleted", "conversation.item.retrieved"))
TRANSCRIPTION = ("conversation.item.input_audio_transcription.delta",
                 "conversation.item.input_audio_transcription.completed",
                 "conversation.item.input_audio_transcription.failed")
SESSION_EVENTS |= frozenset(TRANSCRIPTION)
KNOWN = SESSION_EVENTS | STAGE_OF.keys()
STATUSES = ("completed", "cancelled", "failed", "incomplete")


def _item_id(ev: dict) -> str | None:
    return (ev.get("item") or {}).get("id")


class _Response:
    """What the checker knows of the response under way."""

    def __init__(self, ev: dict):
        r = ev["response"]
        assert r["status"] == "in_progress", f"response.created with status {r['status']}"
        self.id, self.item = r["id"], None
        self.stage = 0
        self.seen: set[str] = {"response.created"}
        self.transcript: list[str] = []

    def step(self, ev: dict) -> None:
        """Moves to `ev`'s stage: later stages only, skipping only the ones that may be absent."""
        kind, stage = ev["type"], STAGE_OF[ev["type"]]
        kinds, _, repeats = STAGES[stage]
        if stage == self.stage:
            assert repeats or kind not in self.seen, f"{kind} twice in response {self.id}"
        else:
            assert stage > self.stage, f"{kind} after {STAGES[self.stage][0]} in response {self.id}"
            left = [k for k in STAGES[self.stage][0] if k not in self.seen and not STAGES[self.stage][1]]
            skipped = [STAGES[i][0] for i in range(self.stage + 1, stage) if not STAGES[i][1]]
            assert not left and not skipped, f"{kind} before {left or skipped} in response {self.id}"
            self.stage = stage
        self.seen.add(kind)


def check_responses(events: list[dict], cut_by_close: bool = False) -> list[dict]:
    """Asserts the order above over one session's server events (as a client received them) and
    returns the `response.done` events.

    Every response that starts ends, with one exception, allowed only with `cut_by_close`: the
    last response of a session the client closed while Moshi spoke. Moshi is full duplex: its
    responses are stretches of its own speech, which go on whether or not the client sends audio,
    so a client that closes at an arbitrary moment can close inside one, and after the close the
    server can send nothing. Responses before the last still have to end."""
    active: _Response | None = None
    ended: set[str] = set()  # ids of the responses done, and of their items
    done: list[dict] = []
    user_items: set[str] = set()  # the user's items added so far
    heard: dict[str, list[str]] = {}  # item -> its transcription deltas so far
    transcribed: set[str] = set()  # items whose transcription completed or failed
    for n, ev in enumerate(events):
        kind = ev.get("type")
        assert kind in KNOWN, f"event {n}: unknown type {kind!r}"
        assert isinstance(ev.get("event_id"), str) and ev["event_id"], f"event {n} ({kind}) has no event_id"
        assert kind != "session.created" or n == 0, f"session.created again at event {n}"
        if kind == "conversation.item.added" and (ev.get("item") or {}).get("role") == "user":
            user_items.add(_item_id(ev))
        if kind in TRANSCRIPTION:
            item = ev["item_id"]
            assert item in user_items, f"{kind} of item {item} before its conversation.item.added (event {n})"
            assert item not in transcribed, f"{kind} of item {item} after its transcription ended (event {n})"
            assert ev["content_index"] == 0
            if kind == TRANSCRIPTION[0]:
                heard.setdefault(item, []).append(ev["delta"])
            else:
                transcribed.add(item)
            if kind == TRANSCRIPTION[1]:
                assert ev["transcript"] == "".join(heard.get(item, [])), "transcription completed is not its deltas"
            continue
        if kind in ("conversation.item.added", "conversation.item.done"):
            item = _item_id(ev)
            assert item not in ended, f"{kind} of item {item} after its response.done"
            if active is None or active.item is None or item != active.item:
                continue  # another item (the user's speech, one the client made): the session's
            rid = active.id
        elif kind in SESSION_EVENTS:
            continue
        else:
            rid = ev["response"]["id"] if kind in ("response.created", "response.done") else ev["response_id"]
            assert rid not in ended, f"{kind} of response {rid} after its response.done"
        if kind == "response.created":
            assert active is None, f"response {rid} started while {active.id} was active"
            active = _Response(ev)
            continue
        assert active is not None, f"{kind} outside a response (event {n})"
        assert rid == active.id, f"{kind} of response {rid} while {active.id} is active"
        active.step(ev)
        if kind == "response.output_item.added":
            assert ev["item"]["role"] == "assistant" and ev["item"]["type"] == "message"
            active.item = _item_id(ev)
        elif kind == "response.output_item.done":
            assert _item_id(ev) == active.item, "output_item.done of another item"
        elif kind in DELTAS or kind.startswith(("response.content_part", "response.output_audio")):
            assert ev["item_id"] == active.item, f"{kind} of item {ev['item_id']}, not the response's {active.item}"
            if kind == "response.output_audio_transcript.delta":
                active.transcript.append(ev["delta"])
            elif kind == "response.output_audio_transcript.done":
                assert ev["transcript"] == "".join(active.transcript), "transcript.done is not its deltas"
        elif kind == "response.done":
            r = ev["response"]
            assert r["status"] in STATUSES, f"response.done with status {r['status']!r}"
            assert [o["id"] for o in r["output"]] == [active.item], "response.done's output is not its item"
            usage = r["usage"]
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            done.append(ev)
            ended |= {active.id, active.item}
            active = None
    assert active is None or cut_by_close, f"response {active.id} never ended (no response.done)"
    return done
