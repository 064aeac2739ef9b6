"""The pieces of `/v1/realtime` alone: G.711, resampling, audio formats, the model's and the user's
turns, client-event checks, and a session's cancel and slow-client handling frame by frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmoshi.serving.realtime import events as E
from openmoshi.serving.realtime import g711
from openmoshi.serving.realtime.formats import InputDecoder, OutputEncoder, Resampler, parse_format
from openmoshi.serving.realtime.turns import END_FRAMES, ENDED, PREFIX_FRAMES, START_FRAMES, STARTED, ModelTurns
from openmoshi.serving.realtime.vad import SpeechDetector, TurnDetection

from realtime_utils import FRAME, RATE, check_responses, run, speech, tone  # noqa: F401 (speech: a fixture)


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
    from openmoshi.serving.realtime.protocol import RealtimeProtocol
    from openmoshi.serving.server import ServerConfig
    from openmoshi.serving.session import Session

    quiet = np.full(FRAME, 1e-4, np.float32)

    async def main():
        server = SimpleNamespace(config=ServerConfig(outbox_frames=1000), metrics=Metrics())
        conv = Session(server, ws=None, peer="test", protocol=RealtimeProtocol())
        conv.on_frame(quiet, " one")
        for _ in range(3):
            conv.on_frame(quiet, None)
        await conv.protocol._on_response_cancel({"type": "response.cancel"})
        cancelled = len(conv.outbox)
        for i in range(30):  # the stretch goes on: a word every 5 frames
            conv.on_frame(quiet, " more" if i % 5 == 0 else None)
        muted = len(conv.outbox)
        for _ in range(END_FRAMES):  # the stretch ends unheard ...
            conv.on_frame(quiet, None)
        conv.on_frame(quiet, " next")  # ... and the next one is a new response, which ends
        for _ in range(END_FRAMES):
            conv.on_frame(quiet, None)
        events = [e for e, _ in conv.outbox]

        slow = Session(SimpleNamespace(config=ServerConfig(outbox_frames=5), metrics=Metrics()),
                       ws=None, peer="slow", protocol=RealtimeProtocol())
        slow.on_frame(quiet, " a")
        for _ in range(40):
            slow.on_frame(quiet, " b")
        return events, cancelled, muted, [e for e, _ in slow.outbox], slow.dropped
    events, cancelled, muted, slow, dropped = run(main())
    done = check_responses(events)
    assert [d["response"]["status"] for d in done] == ["cancelled", "completed"]
    assert events[cancelled - 1]["type"] == "response.done" and muted == cancelled
    assert [e["type"] for e in events[cancelled:]][:1] == ["response.created"] and len(events) > cancelled
    kinds = [e["type"] for e in slow]
    assert kinds.count("response.output_audio.delta") == 5 and dropped == 36
    assert kinds.count("response.output_audio_transcript.delta") == 41  # every word kept
    assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                         "response.content_part.added"]


# ----------------------------------------------------------------------------- the server
