"""`/api/asr-streaming` on moshi-server's msgpack protocol: words, steps and markers equal to
`openmoshi stt` on the same audio, streams joining and leaving mid-way equal to their solo runs,
bad messages answered with Error while the stream and the server go on, moshi-server's auth."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import numpy as np
import pytest
import torch

from official_utils import speech
from server_utils import listening_socket
from stt_utils import make_stt

from openmoshi.engine.speed import SpeedConfig, choose
from openmoshi.inference.stt import tail_frames, transcribe
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.server import MoshiServer, ServerConfig

TOKEN = "public_token"
HEADERS = {"kyutai-api-key": TOKEN}
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_stt(tmp_path_factory.mktemp("stt_server") / "ckpt", seed=5)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(resolve_files(str(folder)), "cpu", torch.float32)


@contextlib.asynccontextmanager
async def stt_server(model, **config):
    config = dict(dict(max_sessions=2, static_dir=None, auth_token=TOKEN), **config)
    server = MoshiServer.for_model(model, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                                   ServerConfig(**config))
    runner, sock = Runner(server), listening_socket()
    await runner.start(sock)
    try:
        yield server, f"ws://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.stop()


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


def stream_of(model, pcm: torch.Tensor) -> np.ndarray:
    """What `openmoshi stt` feeds for this input after the prefix: the input padded to whole frames
    and the silence tail."""
    from openmoshi.lm.stt import SttTiming

    timing = SttTiming.of(model.config)
    whole = -(-pcm.shape[-1] // 1920) * 1920
    return np.concatenate([pcm.numpy(), np.zeros(whole - pcm.shape[-1] + tail_frames(timing) * 1920, np.float32)])


async def run_stream(url: str, samples: np.ndarray, chunk: int, after=None, pace: float = 0.0,
                     extra: list[bytes] = (), marker_silence: int = 8) -> dict:
    """Sends `samples` in chunks of `chunk` (sleeping `pace` between them), then a Marker and
    `marker_silence` frames of silence; reads until the Marker comes back. `after(n)` is awaited
    once n Steps have come (a hook for joining others). Returns the messages by type."""
    import websockets

    got = {"Word": [], "EndWord": [], "Step": [], "Error": [], "Marker": [], "Ready": []}
    async with websockets.connect(url + "/api/asr-streaming", additional_headers=HEADERS) as ws:
        first = msgpack.unpackb(await ws.recv())
        assert first == {"type": "Ready"}, first

        async def send():
            for message in extra:
                await ws.send(message)
            for i in range(0, len(samples), chunk):
                await ws.send(pack({"type": "Audio", "pcm": samples[i:i + chunk].tolist()}))
                if pace:
                    await asyncio.sleep(pace)
            await ws.send(pack({"type": "Marker", "id": 42}))
            await ws.send(pack({"type": "Audio", "pcm": [0.0] * (1920 * marker_silence)}))

        sender = asyncio.create_task(send())
        while True:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
            got[m["type"]].append(m)
            if after is not None and m["type"] == "Step":
                await after(len(got["Step"]))
            if m["type"] == "Marker":
                break
        await sender
    return got


def check_equals_cli(got: dict, solo, atol: float = 0.0) -> None:
    """The stream's first steps and words are those of `openmoshi stt` (which stops there: the
    messages after are from the marker's silence). Pause probabilities are float32 values: exact
    at the same batch size, within float rounding across sizes (`atol`)."""
    steps = got["Step"][:len(solo.prs)]
    assert [s["step_idx"] for s in steps] == list(range(1, len(solo.prs) + 1))
    np.testing.assert_allclose(np.float32([s["prs"] for s in steps]), np.float32(solo.prs), atol=atol, rtol=0)
    words = [(w["text"], w["start_time"]) for w in got["Word"]][:len(solo.words)]
    assert words == [(w.text, w.start) for w in solo.words] and len(words) >= 2
    stops = [e["stop_time"] for e in got["EndWord"]]
    assert stops[:sum(w.stop is not None for w in solo.words)] == [w.stop for w in solo.words if w.stop is not None]


def test_stream_equals_stt_command_and_markers(model):
    """Audio in odd chunk sizes, sent faster than real time: nothing is dropped (buffered_pcm
    says what waits), and the words, stops and pause probabilities are `openmoshi stt`'s."""
    pcm = speech(1.6)
    solo = transcribe(model, [pcm[None]])[0]

    async def main():
        async with stt_server(model) as (_, url):
            return await run_stream(url, stream_of(model, pcm), chunk=1000)

    got = asyncio.run(main())
    check_equals_cli(got, solo)
    assert got["Marker"] == [{"type": "Marker", "id": 42}] and not got["Error"]
    assert max(s["buffered_pcm"] for s in got["Step"]) > 1920  # it came faster than the steps
    # The marker: once the steps reading every frame before it, plus the delay, are done.
    frames = -(-len(stream_of(model, pcm)) // 1920)
    assert len(got["Step"]) == frames + 1 + 6


def test_streams_joining_and_leaving_equal_their_solo_runs(model, monkeypatch):
    """A paced stream; a second one joins once the first has done 10 steps, sends all its audio at
    once and leaves; a third joins after: each gets what it gets alone (rows sit ticks out when
    their client has nothing, their states untouched)."""
    a, b, c = speech(2.4), speech(2.0)[-24000:], speech(1.2)
    solos = transcribe(model, [a[None]])[0], transcribe(model, [b[None]])[0], transcribe(model, [c[None]])[0]
    from openmoshi.engine.engine import Engine

    held, encode = [], Engine.encode

    def counting(self, pcm, *args, hold=None, **kwargs):
        hold = args[1] if len(args) > 1 else hold
        held.append(0 if hold is None else int(hold.sum()))
        return encode(self, pcm, *args[:1], hold=hold, **kwargs)

    monkeypatch.setattr(Engine, "encode", counting)

    async def main():
        async with stt_server(model, max_sessions=3) as (_, url):
            others = []

            async def after(n):
                if n == 10:
                    others.append(asyncio.create_task(run_stream(url, stream_of(model, b), chunk=4000)))
                if n == 30:
                    others.append(asyncio.create_task(run_stream(url, stream_of(model, c), chunk=1920)))

            first = await run_stream(url, stream_of(model, a), chunk=1920, after=after, pace=0.05)
            return [first] + [await t for t in others]

    got = asyncio.run(main())
    for g, solo in zip(got, solos):
        check_equals_cli(g, solo, atol=1e-6)
    assert any(h > 0 for h in held)  # ticks where a stream sat out, its states kept (how many: the machine's load)


def test_bad_messages_get_errors_and_the_stream_goes_on(model):
    bad = [b"\xc1\xff not msgpack", pack({"type": "Bogus"}), pack([1, 2]), pack({"type": "Audio", "pcm": "abc"}),
           pack({"type": "Audio", "pcm": [[0.1, 0.2]]}), pack({"type": "Audio", "pcm": [float("nan")]}),
           pack({"type": "Marker", "id": "x"}), pack({"type": "OggOpus", "data": b"not ogg at all"}),
           pack({"type": "Init"})]
    pcm = speech(1.2)
    solo = transcribe(model, [pcm[None]])[0]

    async def main():
        async with stt_server(model) as (server, url):
            got = await run_stream(url, stream_of(model, pcm), chunk=1920, extra=bad)
            again = await run_stream(url, stream_of(model, pcm), chunk=3000)  # the server goes on
            return got, again, server.health()[0]

    got, again, health = asyncio.run(main())
    assert len(got["Error"]) == len(bad) - 1  # Init is accepted
    messages = " | ".join(e["message"] for e in got["Error"])
    for part in ("not a msgpack message", "unknown message type 'Bogus'", "msgpack map", "list of float32",
                 "NaN", "Marker.id", "Ogg"):
        assert part in messages, messages
    check_equals_cli(got, solo)
    check_equals_cli(again, solo)
    assert health == 200


def test_auth_and_wrong_endpoint(model):
    import websockets

    async def first_message(url, **kw):
        async with websockets.connect(url, **kw) as ws:
            return msgpack.unpackb(await ws.recv()) if "asr" in url else await ws.recv()

    async def main():
        async with stt_server(model) as (_, url):
            asr = url + "/api/asr-streaming"
            no_key = await first_message(asr)
            wrong = await first_message(asr, additional_headers={"kyutai-api-key": "nope"})
            query = await first_message(asr + f"?auth_id={TOKEN}")
            chat = await first_message(url + "/api/chat", additional_headers=HEADERS)
            return no_key, wrong, query, chat

    no_key, wrong, query, chat = asyncio.run(main())
    assert no_key["type"] == "Error" and "unauthorized" in no_key["message"]
    assert wrong["type"] == "Error" and query == {"type": "Ready"}
    assert b"/api/asr-streaming" in chat  # the official protocol's error message says where to go


def test_livekit_kyutai_plugin_gets_the_words_of_openmoshi_stt(model, folder, tmp_path, capsys):
    """The real client: `livekit-plugins-kyutai-lasuite`'s STT stream, fed LiveKit audio frames of
    espeak-ng speech, against /api/asr-streaming: its final transcripts are the words (and start
    times) `openmoshi stt` prints for the same audio file."""
    import json
    import time
    import wave

    import aiohttp
    from livekit import rtc
    from livekit.agents import stt as lk_stt
    from lasuite.plugins import kyutai

    from openmoshi.cli.main import main as cli
    from openmoshi.lm.stt import SttTiming

    pcm16 = np.round(speech(2.0).numpy() * 32767).astype(np.int16)
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as w:  # 16-bit, as LiveKit frames carry it
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(pcm16.tobytes())
    words = transcribe(model, [str(path)])[0].words
    assert len(words) >= 2
    # What `openmoshi stt` adds after the file: its last frame padded, the delay's silence and 1 s.
    tail = -pcm16.size % 1920 + tail_frames(SttTiming.of(model.config)) * 1920
    frames = np.concatenate([pcm16, np.zeros(tail, np.int16)]).reshape(-1, 1920)

    async def main():
        async with stt_server(model) as (_, url):
            async with aiohttp.ClientSession() as hs:
                plugin = kyutai.STT(base_url=url + "/api/asr-streaming", api_key=TOKEN, http_session=hs)
                stream = plugin.stream()
                got = []

                async def read():
                    async for event in stream:
                        if event.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
                            got.append((event.alternatives[0].text, event.alternatives[0].start_time))

                reader = asyncio.create_task(read())
                start = time.monotonic()
                for i, frame in enumerate(frames):  # a real-time audio track
                    stream.push_frame(rtc.AudioFrame(frame.tobytes(), 24000, 1, 1920))
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
                stream.end_input()
                deadline = time.monotonic() + 30
                while len(got) < len(words) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # and nothing more comes
                await stream.aclose()
                reader.cancel()
                return got

    got = asyncio.run(main())
    assert got == [(w.text, w.start) for w in words]
    # `openmoshi stt` on the file prints the same words
    assert cli(["stt", str(path), "--json", "--hf-repo", str(folder), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)["words"]
    assert [(w["text"], w["start"]) for w in printed] == got


def test_ogg_opus_audio(model):
    """OggOpus messages: the server decodes the stream and transcribes what it decodes (Opus is
    lossy: the reference is `openmoshi stt` on the same decoding)."""
    from openmoshi.serving.opus import OpusDecoder, OpusEncoder

    samples = stream_of(model, speech(1.2))
    encoder, pages = OpusEncoder(), []
    for i in range(0, len(samples), 1920):
        page = encoder.encode(samples[i:i + 1920])
        if page:
            pages.append(page)
    decoder = OpusDecoder()
    heard = np.concatenate([decoder.decode(p) for p in pages])
    solo = transcribe(model, [torch.from_numpy(heard)[None]])[0]
    from openmoshi.lm.stt import SttTiming

    silence = tail_frames(SttTiming.of(model.config)) + 1  # the marker's silence is the CLI's tail

    async def main():
        async with stt_server(model) as (_, url):
            return await run_stream(url, np.zeros(silence * 1920, np.float32), 1920,
                                    extra=[pack({"type": "OggOpus", "data": p}) for p in pages])

    got = asyncio.run(main())
    assert not got["Error"] and got["Marker"]
    check_equals_cli(got, solo)


def test_one_process_hosts_moshi_and_stt(model):
    """`serve --stt-model`: a Moshi server and an STT server behind one app, each with its own model
    loop and slots: /api/asr-streaming transcribes as alone, /api/chat reaches Moshi, /health and
    /metrics cover both."""
    import aiohttp
    import websockets

    from server_utils import tiny_models
    from openmoshi.serving.hosting import ModelServers

    pcm = speech(1.2)
    solo = transcribe(model, [pcm[None]])[0]

    async def main():
        stt = MoshiServer.for_model(model, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                                    ServerConfig(max_sessions=1, static_dir=None, auth_token=TOKEN))
        moshi = MoshiServer(*tiny_models(), ServerConfig(max_sessions=1, static_dir=None, auth_token=TOKEN))
        runner, sock = Runner(ModelServers([moshi, stt])), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}"
        try:
            got = await run_stream(url, stream_of(model, pcm), chunk=1920)
            async with websockets.connect(url + "/api/chat", additional_headers=HEADERS) as ws:
                handshake = await ws.recv()
            async with aiohttp.ClientSession() as hs:
                async with hs.get(url.replace("ws:", "http:") + "/health") as r:
                    health = (r.status, await r.json())
                async with hs.get(url.replace("ws:", "http:") + "/metrics") as r:
                    metrics = await r.text()
            return got, handshake, health, metrics
        finally:
            await runner.stop()

    got, handshake, (status, body), metrics = asyncio.run(main())
    check_equals_cli(got, solo)
    assert handshake == b"\x00"  # the official protocol's handshake: Moshi took the conversation
    assert status == 200 and set(body["models"]) == {"speech", "stt"}
    assert metrics.count("# TYPE openmoshi_step_seconds histogram") == 1
    assert 'openmoshi_conversations_max{model="stt"} 1' in metrics and 'model="speech"' in metrics
