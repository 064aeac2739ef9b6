"""The headless client (`openmoshi client --input ... --output ...`) against a protocol stub and
against the real server with a tiny random model; connection errors; the playback queue."""

import asyncio
import wave

import numpy as np
import pytest

from openmoshi.cli import main as cli
from openmoshi.cli.common import EXIT_USAGE
from openmoshi.serving.client import (FRAME_SIZE, SAMPLE_RATE, ClientError, ServerError, _Playback, chat_url,
                              talk_file)
from openmoshi.serving.latency import LatencyMeter

from chat_stub import AppServer, ChatStub, StubServer


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _write_wav(path, pcm) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())


@pytest.mark.parametrize("given, expected", [
    ("ws://h:1", "ws://h:1/api/chat"),
    ("localhost:8998", "ws://localhost:8998/api/chat"),
    ("https://example.org/", "wss://example.org/api/chat"),
    ("http://h:2/prefix/api/chat", "ws://h:2/prefix/api/chat"),
    ("wss://[::1]:3", "wss://[::1]:3/api/chat"),
])
def test_chat_url(given, expected):
    assert chat_url(given) == expected


def test_chat_url_query_and_errors():
    url = chat_url("ws://h:1", {"text_topk": 5, "audio_seed": None}, auth_token="s3cret")
    assert url == "ws://h:1/api/chat?text_topk=5&worker_auth_id=s3cret"
    for bad in ("ftp://h", "ws://h:99999", "ws://:1"):
        with pytest.raises(ValueError, match="bad URL"):
            chat_url(bad)


def test_talk_file_against_stub():
    with StubServer() as server:
        result = asyncio.run(talk_file(server.url, _tone(1.2), params={"text_topk": 7}, tail_s=3.0))
        log = server.stub.log
    frames = -(-int(1.2 * SAMPLE_RATE) // FRAME_SIZE)
    assert log.samples_in >= (frames - 1) * FRAME_SIZE  # sphn may hold back the last packet
    assert log.query[0]["text_topk"] == "7"
    assert result.seconds_received >= (frames - 2) * FRAME_SIZE / SAMPLE_RATE
    assert "word1" in result.text
    assert np.abs(result.audio).max() > 0.1  # the echo, not silence


def test_refused_busy_and_auth():
    with StubServer(ChatStub(busy=True)) as server:
        with pytest.raises(ServerError, match="busy"):
            asyncio.run(talk_file(server.url, _tone(0.2)))
    with StubServer(ChatStub(auth_token="right")) as server:
        with pytest.raises(ServerError, match="authentication"):
            asyncio.run(talk_file(server.url, _tone(0.2), auth_token="wrong"))
        result = asyncio.run(talk_file(server.url, _tone(0.3), auth_token="right", tail_s=1.0))
        assert result.seconds_sent > 0
        port = server.port
    with pytest.raises(ClientError, match="connection refused"):
        asyncio.run(talk_file(f"ws://127.0.0.1:{port}", _tone(0.2)))  # nobody listens there now


def test_server_that_vanishes_mid_conversation_says_reconnect():
    """A server process (or a Ray replica) that dies drops the TCP connection without a close frame:
    the client says the connection was lost and to reconnect, rather than ending as if all went well."""
    from aiohttp import web

    async def chat(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00")  # handshake
        await ws.receive()
        request.transport.abort()  # gone: no close frame
        return ws

    app = web.Application()
    app.router.add_get("/api/chat", chat)
    with AppServer(app) as server:
        with pytest.raises(ClientError, match="lost .*reconnect"):
            asyncio.run(talk_file(server.url, _tone(1.0), tail_s=2.0))


def test_waiting_for_a_slot(tmp_path, capsys):
    """A busy server keeps us waiting before the handshake: each place in line is reported, then
    the conversation goes on as usual; the command line prints each new place once."""
    places = []
    with StubServer(ChatStub(queue=2, queue_interval=0.1)) as server:
        result = asyncio.run(talk_file(server.url, _tone(0.3), tail_s=1.0, on_queue=lambda *a: places.append(a)))
    assert places == [(2, 2), (2, 2), (1, 1), (1, 1)] and result.seconds_received > 0
    wav = tmp_path / "in.wav"
    _write_wav(wav, _tone(0.2))
    with StubServer(ChatStub(queue=2, queue_interval=0.1)) as server:
        assert cli.main(["client", "--url", server.url, "--input", str(wav), "--tail", "0.5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "waiting for a free slot: position 2 of 2" in err and err.count("position 1 of 1") == 1


def test_cli_errors(tmp_path, capsys):
    wav = tmp_path / "in.wav"
    _write_wav(wav, _tone(0.2))
    with pytest.raises(SystemExit) as e:
        cli.main(["client", "--url", "ftp://x", "--input", str(wav)])
    assert e.value.code == EXIT_USAGE
    assert "bad URL" in capsys.readouterr().err
    with StubServer(ChatStub(busy=True)) as server:
        assert cli.main(["client", "--url", server.url, "--input", str(wav)]) == 1
    err = capsys.readouterr().err
    assert "busy" in err and "Traceback" not in err


def test_playback_is_the_jitter_buffer_and_drops_oldest_to_catch_up():
    """The live speaker queue is `jitter.JitterBuffer` (tests/test_jitter.py) behind a lock."""
    p = _Playback(buffer_s=0.02, max_lag_s=0.32)
    assert not p.pull(480).any()  # nothing queued yet: silence
    p.push(np.arange(1, 24001, dtype=np.float32))  # 1 s arrives at once: keep the hold + one frame
    assert p.dropped == 24000 - 480 - FRAME_SIZE
    out = p.pull(480 + 2400)  # 20 ms of hold, then the newest audio
    assert not out[:480].any() and out[480] == 24000 - 480 - FRAME_SIZE + 1 and out[-1] == 24000
    assert p.pull(10).sum() == 0 and p.underruns == 1 and p.target == 480 + 480  # raised by 20 ms


def test_file_mode_reports_the_latency_it_measured(tmp_path, capsys):
    """Against a stub that answers like a model (frame k once frame k + 1 is in) 100 ms late, the
    latency measured is those 100 ms plus the network, in TalkResult and on the command line."""
    meter = LatencyMeter()
    with StubServer(ChatStub(lag_frames=1, answer_after_s=0.1)) as server:
        result = asyncio.run(talk_file(server.url, _tone(1.6), tail_s=1.0, meter=meter))
    lat = result.latency
    assert lat == meter.summary() and lat["chunks"] >= 15
    assert 100 <= lat["p50_ms"] <= lat["p90_ms"] < 100 + 250  # generous: a loaded 2-core machine
    wav = tmp_path / "in.wav"
    _write_wav(wav, _tone(0.8))
    with StubServer(ChatStub(lag_frames=1, answer_after_s=0.1)) as server:
        assert cli.main(["client", "--url", server.url, "--input", str(wav), "--tail", "1", "--quiet"]) == 0
    line, = [x for x in capsys.readouterr().err.splitlines() if "latency" in x]
    p50 = float(line.split("latency p50 ")[1].split(" ms")[0])
    assert 100 <= p50 < 350, line


@pytest.mark.slow
def test_cli_headless_against_server(tmp_path, capsys):
    """`openmoshi client --input --output --transcript` holds a conversation with the real server."""
    from openmoshi.serving.server import MoshiServer, ServerConfig

    from server_utils import tiny_models

    wav, out, text = tmp_path / "in.wav", tmp_path / "out.wav", tmp_path / "text.txt"
    _write_wav(wav, _tone(2.0))
    moshi = MoshiServer(*tiny_models(), ServerConfig(max_sessions=2, static_dir=None))
    with AppServer(moshi) as server:
        code = cli.main(["client", "--url", server.url, "--input", str(wav), "--output", str(out),
                         "--transcript", str(text), "--tail", "4", "--text-temperature", "0.5"])
    assert code == 0, capsys.readouterr().err
    with wave.open(str(out)) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1
        n = w.getnframes()
    assert n >= 20 * FRAME_SIZE  # most of the 25 frames came back
    assert text.read_text().strip() != ""  # the tiny model's random text
    assert "received" in capsys.readouterr().err


def test_live_mode_without_sounddevice_says_so(monkeypatch):
    import sys

    from openmoshi.serving.client import _sounddevice

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import raises ImportError
    with pytest.raises(ClientError, match="sounddevice"):
        _sounddevice()
