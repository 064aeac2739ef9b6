"""The Realtime event-order checker itself (realtime_order.check_responses): it passes what the API
documents and fails hand-built sequences of a wrong server, each for its own reason."""

from __future__ import annotations

import itertools

import pytest

from realtime_order import check_responses

_ids = itertools.count()


def ev(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": f"event_{next(_ids)}", **fields}


def response(rid: str, words=("Hi", " there"), status: str = "completed") -> list[dict]:
    """One response's events in the documented order, as our server sends them."""
    iid = "item_" + rid
    ids = dict(response_id=rid, item_id=iid, output_index=0, content_index=0)
    item = {"id": iid, "type": "message", "role": "assistant"}
    usage = {"total_tokens": 5, "input_tokens": 2, "output_tokens": 3}
    out = [ev("response.created", response={"id": rid, "status": "in_progress", "output": []}),
           ev("response.output_item.added", response_id=rid, output_index=0, item=item),
           ev("conversation.item.added", item=item),
           ev("response.content_part.added", **ids, part={"type": "audio"})]
    for w in words:
        out += [ev("response.output_audio_transcript.delta", **ids, delta=w),
                ev("response.output_audio.delta", **ids, delta="AAAA")]
    return out + [ev("response.output_audio.done", **ids),
                  ev("response.output_audio_transcript.done", **ids, transcript="".join(words)),
                  ev("response.content_part.done", **ids, part={"type": "audio"}),
                  ev("response.output_item.done", response_id=rid, output_index=0, item=item),
                  ev("conversation.item.done", item=item),
                  ev("response.done", response={"id": rid, "status": status, "output": [item], "usage": usage})]


def session() -> list[dict]:
    """Two responses, with the user's speech and an error between and inside them."""
    user = {"id": "item_user", "type": "message", "role": "user"}
    first, second = response("r1"), response("r2", status="cancelled")
    return ([ev("session.created", session={}), ev("input_audio_buffer.speech_started", item_id="item_user")]
            + first[:6] + [ev("input_audio_buffer.speech_stopped", item_id="item_user"),
                           ev("input_audio_buffer.committed", item_id="item_user"),
                           ev("conversation.item.added", item=user), ev("conversation.item.done", item=user),
                           ev("error", error={"code": "x"})] + first[6:] + second)


def without(events, kind, which=0):
    """`events` less the `which`-th event of type `kind`."""
    at = [i for i, e in enumerate(events) if e["type"] == kind][which]
    return events[:at] + events[at + 1:]


def test_the_documented_order_passes():
    done = check_responses(session())
    assert [d["response"]["id"] for d in done] == ["r1", "r2"]
    # No deltas (a response cancelled before its first frame went out) and no conversation.item.done.
    bare = [e for e in response("r3") if e["type"] not in ("response.output_audio.delta",
                                                          "response.output_audio_transcript.delta",
                                                          "conversation.item.done")]
    bare = [dict(e, transcript="") if e["type"].endswith("transcript.done") else e for e in bare]
    assert len(check_responses(bare)) == 1
    # The two output .done events in the other order.
    swapped = response("r4")
    a, b = (i for i, e in enumerate(swapped) if e["type"] in ("response.output_audio.done",
                                                             "response.output_audio_transcript.done"))
    swapped[a], swapped[b] = swapped[b], swapped[a]
    assert len(check_responses(swapped)) == 1


@pytest.mark.parametrize("wrong,message", [
    # A server that drops response.done: the next response overlaps, or the last never ends.
    (lambda s: without(s, "response.done", 0), "started while r1 was active"),
    (lambda s: without(s, "response.done", 1), "never ended"),
    # A stage twice, or in the wrong place, or missing.
    (lambda s: s[:6] + [s[5]] + s[6:], "response.content_part.added twice"),
    (lambda s: without(s, "response.output_audio.done"), "content_part.done before .*'response.output_audio.done'"),
    (lambda s: without(s, "response.content_part.added"), "delta before .*content_part.added"),
    (lambda s: without(s, "response.output_item.added"), "content_part.added before .*output_item.added"),
    (lambda s: [e for e in s if not (e["type"] == "conversation.item.added" and e["item"]["role"] == "assistant")],
     "content_part.added before .*'conversation.item.added'"),
    (lambda s: _swap(s, "response.content_part.done", "response.output_item.done"),
     "output_item.done before .*content_part.done"),
    (lambda s: _swap(s, "response.content_part.added", "response.output_audio.delta"),
     "audio.delta before .*content_part.added"),
    (lambda s: s + [dict(s[-1], event_id="again")], "after its response.done"),
    # Nothing of a response after its response.done, no unknown event, no stray event.
    (lambda s: _insert_after_done(s, "response.output_audio.delta"), "after its response.done"),
    (lambda s: s[:3] + [ev("response.output_text.delta", response_id="r1", delta="x")] + s[3:], "unknown type"),
    (lambda s: s[:3] + [ev("response.teleport")] + s[3:], "unknown type"),
    (lambda s: [ev("response.output_audio.delta", response_id="r0", item_id="i0", delta="")] + s[1:],
     "outside a response"),
    (lambda s: s + [ev("session.created", session={})], "session.created again"),
    (lambda s: [dict(e, transcript="other") if e["type"].endswith("transcript.done") else e for e in s],
     "not its deltas"),
    (lambda s: [{k: v for k, v in e.items() if k != "event_id"} if e["type"] == "error" else e for e in s],
     "no event_id"),
])
def test_a_wrong_server_fails(wrong, message):
    bad = wrong(session())
    with pytest.raises(AssertionError, match=message):
        check_responses(bad)


def _swap(events, a, b):
    i = next(n for n, e in enumerate(events) if e["type"] == a)
    j = next(n for n, e in enumerate(events) if e["type"] == b)
    events = list(events)
    events[i], events[j] = events[j], events[i]
    return events


def _insert_after_done(events, kind):
    """A `kind` event of the first response right after that response's response.done."""
    at = next(n for n, e in enumerate(events) if e["type"] == "response.done")
    late = next(e for e in events[:at] if e["type"] == kind)
    return events[:at + 1] + [dict(late, event_id="late")] + events[at + 1:]


def test_only_the_last_response_may_be_cut_by_the_close():
    """A client that closes while Moshi speaks leaves its last response open: allowed only when the
    test says the client closed it, and only for the last response."""
    cut = session()[:-3]
    with pytest.raises(AssertionError, match="r2 never ended"):
        check_responses(cut)
    assert [d["response"]["id"] for d in check_responses(cut, cut_by_close=True)] == ["r1"]
    with pytest.raises(AssertionError, match="started while r1 was active"):
        check_responses(without(session(), "response.done", 0), cut_by_close=True)
