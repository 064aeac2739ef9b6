"""Echo cancellation in `openmoshi client` (issue 10): on a simulated room (benchmarks/aec.py: Moshi's
espeak-ng voice through the client's own sound card callback, a room impulse response and the card's
round trip, the user's espeak-ng voice on top), the client's canceller removes the echo and keeps the
user; a wrong reference or a wrong round trip fails the same floors."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import aec as room  # noqa: E402  benchmarks/aec.py

from openmoshi.serving.aec import FRAME_10MS, AecUnavailable, EchoCanceller, EchoPath, round_trip_samples  # noqa: E402
from openmoshi.serving.client import ClientError, talk_live  # noqa: E402

ERLE_FLOOR_DB = 20.0  # far end alone; measured ~32 dB (benchmarks/RESULTS.md)


@pytest.fixture(scope="module")
def scene():
    far = room.espeak(room.MOSHI_TEXT, "en-us")
    user = room.espeak(room.USER_TEXT, "en-gb+f3", pitch=70)
    return room.make_scene(far, user, rt60_s=0.3, round_trip_s=0.06, seconds=9.0, near_start_s=5.0)


def test_client_cancels_the_echo_and_keeps_the_user(scene):
    row = room.run(scene, "client")
    assert row["erle_db"] >= ERLE_FLOOR_DB, row
    # Double talk, the echo as loud as the user: the user is ducked a little, never muted.
    assert row["near_level_db"] > -8.0 and row["near_snr_after_db"] > -3.0, row
    alone = room.run(scene, "moshi-silent")  # the user alone goes through nearly untouched
    assert alone["near_snr_after_db"] > 15.0 and abs(alone["near_level_db"]) < 1.5, alone


@pytest.mark.parametrize("case", ["no-aec", "late-reference", "other-reference"])
def test_a_wrong_reference_or_round_trip_fails_the_floor(scene, case):
    """The measurement can tell: without the played audio as reference, or with the reference
    queued later than its echo (the callback's timestamps misread), the echo stays."""
    assert room.run(scene, case)["erle_db"] < 10.0


def test_the_metric_catches_a_canceller_that_mutes_the_user(scene):
    mic, _ = room.through_client(scene)
    row = room.measure(scene, mic, mic * 1e-3)
    assert row["erle_db"] > 50 and row["near_level_db"] < -50


def test_echo_path_delays_the_played_audio_by_the_round_trip():
    rng = np.random.default_rng(0)
    played = rng.standard_normal(20 * 480).astype(np.float32)
    path = EchoPath(1000)
    reference = np.concatenate([path.step(played[i : i + 480], 480) for i in range(0, len(played), 480)])
    np.testing.assert_array_equal(reference[:1000], 0)
    np.testing.assert_array_equal(reference[1000:], played[: len(played) - 1000])
    with pytest.raises(ValueError):
        EchoPath(-1)


def test_client_callback_pairs_each_mic_frame_with_what_was_played_a_round_trip_earlier():
    """`client._Duplex` reads the round trip from the callback's timestamps: the reference of the
    microphone sample captured at t is the speaker sample played at t."""
    from openmoshi.serving.client import _Duplex, _Playback

    rng = np.random.default_rng(1)
    far = rng.uniform(-0.5, 0.5, 10 * room.FRAME_SIZE).astype(np.float32)
    playback, frames, played = _Playback(max_lag_s=10.0), [], []
    playback.push(far)
    duplex = _Duplex(playback, lambda mic, ref: frames.append((mic, ref)), fallback_s=0.5)
    out = np.zeros((room.BLOCK, 1), np.float32)
    for k in range(len(far) // room.BLOCK):
        t = k * room.BLOCK / room.SAMPLE_RATE
        mic = np.full((room.BLOCK, 1), k, np.float32)
        duplex(mic, out, room.BLOCK, types.SimpleNamespace(inputBufferAdcTime=t, outputBufferDacTime=t + 0.05), None)
        played.append(out[:, 0].copy())
    played = np.concatenate(played)
    mic = np.concatenate([m for m, _ in frames])
    reference = np.concatenate([r for _, r in frames])
    assert all(len(m) == len(r) == room.FRAME_SIZE for m, r in frames) and len(mic) == len(played)
    np.testing.assert_array_equal(mic, np.repeat(np.arange(len(played) // room.BLOCK), room.BLOCK))
    d = int(0.05 * room.SAMPLE_RATE)
    np.testing.assert_array_equal(reference[:d], 0)
    np.testing.assert_array_equal(reference[d:], played[:-d])


def test_round_trip_from_timestamps_or_the_stream_latency():
    assert round_trip_samples(10.0, 10.06, fallback_s=0.5) == 1440
    assert round_trip_samples(0.0, 0.0, fallback_s=0.05) == 1200  # host API without timestamps


def test_canceller_rejects_misaligned_input():
    canceller = EchoCanceller()
    with pytest.raises(ValueError):
        canceller.process(np.zeros(FRAME_10MS + 1, np.float32), np.zeros(FRAME_10MS + 1, np.float32))
    out = canceller.process(np.zeros(4 * FRAME_10MS, np.float32), np.zeros(4 * FRAME_10MS, np.float32))
    assert out.shape == (4 * FRAME_10MS,) and out.dtype == np.float32


def test_missing_package_says_how_to_install_or_turn_it_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "livekit", None)  # import raises ImportError
    with pytest.raises(AecUnavailable, match="pip install"):
        EchoCanceller()
    monkeypatch.setitem(sys.modules, "sounddevice", types.ModuleType("sounddevice"))
    with pytest.raises(ClientError, match="--no-aec"):  # before connecting to anything
        asyncio.run(talk_live("ws://127.0.0.1:9"))


def test_cli_turns_it_off_with_no_aec():
    from openmoshi.cli.main import build_parser

    assert build_parser().parse_args(["client"]).aec is True
    assert build_parser().parse_args(["client", "--no-aec"]).aec is False


class _FakeStream:
    """sounddevice.Stream as the client uses it: full duplex, the callback run from a thread every
    20 ms with the mic hearing a tone, until the stream is closed."""

    opened: list[dict] = []

    def __init__(self, **kw):
        self.kw = kw
        self.latency = (0.01, 0.03)
        self.stop = False
        _FakeStream.opened.append(kw)

    def _run(self):
        import time

        n, t = self.kw["blocksize"], 0.0
        out = np.zeros((n, 1), np.float32)
        while not self.stop:
            tone = 0.3 * np.sin(2 * np.pi * 440 * (t + np.arange(n) / room.SAMPLE_RATE)).astype(np.float32)
            times = types.SimpleNamespace(inputBufferAdcTime=0.0, outputBufferDacTime=0.0)  # none: latency
            self.kw["callback"](tone[:, None], out, n, times, None)
            t += n / room.SAMPLE_RATE
            time.sleep(n / room.SAMPLE_RATE)

    def __enter__(self):
        import threading

        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


@pytest.mark.parametrize("echo_cancel", [True, False])
def test_live_mode_runs_the_microphone_through_the_canceller(monkeypatch, echo_cancel):
    from chat_stub import StubServer

    calls = []
    real = EchoCanceller.process
    monkeypatch.setattr(EchoCanceller, "process", lambda self, mic, ref: calls.append(len(mic)) or real(self, mic, ref))
    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(Stream=_FakeStream))
    _FakeStream.opened.clear()

    async def talk_briefly(server):
        task = asyncio.create_task(talk_live(server.url, echo_cancel=echo_cancel))
        # Until the microphone's audio has reached the server (and gone through the canceller when
        # it is on), however slow the machine, rather than for a second that it may not suffice.
        deadline = time.monotonic() + 30
        while not (server.stub.log.samples_in > 0 and (calls or not echo_cancel)) and time.monotonic() < deadline:
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with StubServer() as server:
        asyncio.run(talk_briefly(server))
        samples_in = server.stub.log.samples_in
    kw, = _FakeStream.opened
    assert kw["samplerate"] == room.SAMPLE_RATE and kw["channels"] == 1 and kw["blocksize"] == room.BLOCK
    assert samples_in > 0  # the microphone reached the server
    assert (len(calls) > 0) == echo_cancel and set(calls) <= {room.FRAME_SIZE}


def test_live_mode_reports_the_latency_as_heard(monkeypatch):
    """Live, every window: the latency on arrival (a stub answering like a model, 100 ms late) and
    as heard, which adds the jitter buffer's hold and the sound card's output latency (30 ms here)."""
    from chat_stub import ChatStub, StubServer

    from openmoshi.serving import client

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(Stream=_FakeStream))
    monkeypatch.setattr(client, "LATENCY_WINDOW_S", 0.5)
    reports = []

    async def talk_until_reported(server):
        task = asyncio.create_task(talk_live(server.url, echo_cancel=False, on_latency=reports.append))
        deadline = time.monotonic() + 30
        while not any(r.get("heard_p50_ms") for r in reports[1:]) and time.monotonic() < deadline:
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with StubServer(ChatStub(lag_frames=1, answer_after_s=0.1)) as server:
        asyncio.run(talk_until_reported(server))
    r = [r for r in reports if r.get("heard_p50_ms")][-1]
    assert 100 <= r["p50_ms"] < 350 and r["chunks"] > 0, reports
    # Heard: the arrival latency, the hold (at least 20 ms) and the 30 ms of output; the wait of a
    # chunk's last sample also counts its 80 ms (the latency on arrival is that sample's).
    assert r["heard_p50_ms"] >= r["p50_ms"] + 20 + 30, reports
    assert r["heard_p50_ms"] < r["p50_ms"] + 30 + 320 + 80 and r["buffer_ms"] >= 20, reports
