"""`/api/tts_streaming` on moshi-server's protocol: a text streamed word by word is said exactly as
the offline generation says it (itself equal to the official `TTSModel`, see test_tts.py), streams
joining and leaving never change another's speech, every output format and the POST WAV carry the
same audio, bad messages get Error while the stream and the server go on, and one process hosts
TTS beside STT (`openmoshi serve --tts-model`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

import msgpack
import numpy as np
import pytest
import torch

from server_utils import listening_socket
from tts_utils import VOICE_FRAMES, make_tts_checkpoint, make_voice

from openmoshi.inference.tts import load_tts
from openmoshi.lm.tts import TTSSettings, generate, word_timings
from openmoshi.lm.tts_script import script_to_entries
from openmoshi.loading.resolve import resolve_files
from openmoshi.loading.tts_voices import load_speaker_embedding
from openmoshi.serving.app import Runner
from openmoshi.serving.server import MoshiServer, ServerConfig
from openmoshi.serving.tts import TTSHost, wav_header

TOKEN = "tts_token"
HEADERS = {"kyutai-api-key": TOKEN}
TEXT = "Hello there, my friend. How are you doing today?"
OTHER = "The quick brown fox jumps over the lazy dog again."
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tts_server") / "ckpt"
    make_tts_checkpoint(folder, "emb", seed=2)
    make_voice(folder / "voices", "alice", 3)
    make_voice(folder / "voices" / "expresso", "bob", 4)
    return folder


@pytest.fixture(scope="module")
def model(folder):
    return load_tts(resolve_files(str(folder)), "cpu", torch.float32, voice_repo=str(folder / "voices"))


@contextlib.asynccontextmanager
async def tts_server(model, record: dict | None = None, **config):
    config = dict(dict(max_sessions=3, static_dir=None, auth_token=TOKEN), **config)
    host = TTSHost.build(model, TTSSettings(), "alice")
    m = model.model
    server = MoshiServer(m.lm, m.mimi, m.tokenizer, ServerConfig(**config), tts=host)
    if record is not None:  # every stream's frames, by its order of arrival (seat objects differ)
        seats = {}

        def recorder(seat, _pcm, text, audio, _valid):
            record.setdefault(seats.setdefault(seat, len(seats)), []).append((text, *audio.tolist()))

        server.loop.recorder = recorder
    runner, sock = Runner(server), listening_socket()
    await runner.start(sock)
    try:
        yield server, f"ws://127.0.0.1:{sock.getsockname()[1]}/api/tts_streaming"
    finally:
        await runner.stop()


async def speak(url: str, words, query: str = "format=PcmMessagePack", after=None, headers=HEADERS,
                mixed: bool = True, voice_message: dict | None = None, extra=()) -> dict:
    """Streams `words` one message each (text frames and msgpack Text alternately when `mixed`), then
    Eos; reads until the server closes. `after(n)` is awaited once n audio messages have come.
    Returns the messages by type, and raw binary messages under "raw"."""
    import websockets

    got = defaultdict(list)
    async with websockets.connect(f"{url}?{query}", additional_headers=headers) as ws:
        async def send():
            if voice_message is not None:
                await ws.send(msgpack.packb(voice_message, use_bin_type=True, use_single_float=True))
            for message in extra:
                await ws.send(message)
            for i, w in enumerate(words):
                text = w if i == 0 else " " + w
                await ws.send(msgpack.packb({"type": "Text", "text": text}) if mixed and i % 2 else text)
                await asyncio.sleep(0.01)
            await ws.send(b"\0" if mixed else msgpack.packb({"type": "Eos"}))

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(data, str):
                    got["text_frames"].append(data)
                    continue
                if "MessagePack" not in query:
                    got["raw"].append(data)
                    continue
                m = msgpack.unpackb(data)
                got[m["type"]].append(m)
                if after is not None and m["type"] in ("Audio", "OggOpus"):
                    await after(len(got[m["type"]]))
        except websockets.ConnectionClosed as e:
            got["close"] = [e.rcvd.code if e.rcvd else None]
        await sender
    return got


def offline(model, text: str, settings: TTSSettings, voice: str = "alice", embedding=None):
    """The offline generation of `text` in the server's conditions ([voice, voice], greedy). A
    voice shorter than the server's default is generated beside the default voice, as the official
    batch pads it (the server's state holds the default voice's length)."""
    from dataclasses import replace

    host = TTSHost.build(model, settings, "alice")
    emb = embedding if embedding is not None else host.voice(voice)[0][0]
    values = [host.values([emb], None)]
    m, fr = model.model, model.frame_rate
    entries = [script_to_entries(m.tokenizer, [text], fr, True, settings.padding_between)]
    if emb.shape[1] < host.voice("alice")[0][0].shape[1]:
        values.append(host.values(host.voice("alice")[0], None))
        entries.append(entries[0])
    n_q = min(settings.n_q or m.lm.cfg.dep_q, m.lm.cfg.dep_q)
    result = generate(m.lm, model.spec, replace(settings, n_q=n_q), entries, values)
    audio = result.frames[0, 1:, model.spec.delay_steps:]
    pcm = model.decode(audio[None])[0]
    return result, pcm.clamp(-0.99, 0.99).numpy(), word_timings(result.scripts[0], fr)


GREEDY = TTSSettings(temp=0.0)


def test_streamed_words_are_said_as_the_offline_generation_says_them(model):
    """Greedy: the LM's frames (text and audio codes) exactly the offline generation's (which
    test_tts.py proves equal to the official TTSModel), the audio its decoding, the words and
    their times `word_timings`'. The text comes one word per message, as text frames and msgpack."""
    result, pcm, words = offline(model, TEXT, GREEDY)
    record = {}

    async def main():
        async with tts_server(model, record) as (_, url):
            return await speak(url, TEXT.split(), "format=PcmMessagePack&temperature=0")

    got = asyncio.run(main())
    frames = np.array(record[0])  # [T, 1 + Q] from max_delay on
    assert frames.shape[0] == result.frames.shape[-1]
    np.testing.assert_array_equal(frames.T, result.frames[0].numpy())
    audio = np.concatenate([np.float32(m["pcm"]) for m in got["Audio"]])
    assert len(got["Audio"]) == result.frames.shape[-1] - model.spec.delay_steps and audio.shape == pcm.shape
    np.testing.assert_allclose(audio, pcm, atol=1e-5, rtol=0)
    said = [(m["text"], m["start_s"], m["stop_s"]) for m in got["Text"]]
    assert said == [(w, s, e) for w, s, e in words] and [w for w, *_ in said] == TEXT.split()
    assert got["close"] == [1000] and not got["Error"]


def test_streams_joining_and_leaving_never_change_a_stream(model):
    """Sampling (temperature 0.6, seeds): a stream alone, then the same stream while another joins
    after its 5th audio frame and a third leaves half-way: the same frames exactly, and each stream's
    own speech depends on its seed (two seeds differ)."""
    query = "format=PcmMessagePack&seed=7"

    async def solo():
        record = {}
        async with tts_server(model, record) as (_, url):
            got = await speak(url, TEXT.split(), query)
        return record[0], got

    async def crowded():
        record, tasks = {}, []
        async with tts_server(model, record) as (server, url):
            leaver = asyncio.create_task(speak(url, OTHER.split()[:4], "format=PcmMessagePack&seed=1"))
            await asyncio.sleep(0.05)

            async def after(n):
                if n == 5:
                    tasks.append(asyncio.create_task(speak(url, OTHER.split(), "format=PcmMessagePack&seed=3")))

            got = await speak(url, TEXT.split(), query, after=after)
            await leaver
            await asyncio.gather(*tasks)
            assert server.loop.tick_errors == 0
        return record, got

    alone, got_alone = asyncio.run(solo())
    record, got = asyncio.run(crowded())
    ours = next(frames for frames in record.values() if len(frames) == len(alone) and frames[0] == alone[0]
                and frames == alone)  # the one stream among three that equals its solo run
    assert ours == alone and len(record) == 3
    assert [m["text"] for m in got["Text"]] == [m["text"] for m in got_alone["Text"]]
    np.testing.assert_allclose(np.float32([x for m in got["Audio"] for x in m["pcm"]]),
                               np.float32([x for m in got_alone["Audio"] for x in m["pcm"]]), atol=1e-5, rtol=0)
    others = [frames for frames in record.values() if frames is not ours]
    assert all(frames[:20] != alone[:20] for frames in others)


def test_every_format_carries_the_same_speech(model):
    """Pcm: raw float32 little-endian, no messages; PcmMessagePack: Audio messages of the same
    samples; OggOpus (the default) and OggOpusMessagePack: an Ogg/Opus stream of the same length;
    the POST of {text, voice}: a WAV of the same samples in 16 bits."""
    import sphn
    import soundfile as sf

    async def main():
        async with tts_server(model) as (_, url):
            out = {}
            for fmt in ("Pcm", "PcmMessagePack", "OggOpusMessagePack"):
                out[fmt] = await speak(url, TEXT.split(), f"format={fmt}&temperature=0")
            out["OggOpus"] = await speak(url, TEXT.split(), "temperature=0")  # the default format
            port = url.split(":")[2].split("/")[0]
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tts_streaming?temperature=0",
                                             json.dumps({"text": TEXT, "voice": "alice"}).encode(), headers=HEADERS)
            out["wav"] = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=60).read())
            return out

    out = asyncio.run(main())
    raw = np.frombuffer(b"".join(out["Pcm"]["raw"]), dtype="<f4")
    packed = np.float32([x for m in out["PcmMessagePack"]["Audio"] for x in m["pcm"]])
    assert all(len(b) == 1920 * 4 for b in out["Pcm"]["raw"]) and not out["Pcm"]["text_frames"]
    np.testing.assert_array_equal(raw, packed)
    assert out["PcmMessagePack"]["Ready"] == [{"type": "Ready"}] and len(out["PcmMessagePack"]["Text"]) == 9
    for fmt, pages in (("OggOpus", out["OggOpus"]["raw"]),
                       ("OggOpusMessagePack", [m["data"] for m in out["OggOpusMessagePack"]["OggOpus"]])):
        assert pages[0].startswith(b"OggS") and all(p.startswith(b"OggS") for p in pages), fmt
        reader = sphn.OpusStreamReader(24000)  # as a client reads them: message by message
        decoded = np.concatenate([np.asarray(reader.append_bytes(p)).reshape(-1) for p in pages])
        assert abs(decoded.shape[0] - raw.shape[0]) <= 2 * 1920, (fmt, decoded.shape, raw.shape)
    wav = out["wav"]
    assert wav.startswith(wav_header())
    samples = np.frombuffer(wav[len(wav_header()):], dtype="<i2")
    np.testing.assert_array_equal(samples, (np.clip(raw, -1, 1) * 32767).astype("<i2"))
    x, sr = sf.read(io.BytesIO(wav), dtype="int16")
    assert sr == 24000 and x.shape[0] == raw.shape[0]


def test_a_voice_of_the_clients_own_and_voices_by_name(model, folder):
    """A Voice message (moshi-server's {embeddings, shape}) before the text conditions the stream
    on that embedding; `voice=expresso/bob` names a voice of the repository; both equal offline."""
    embedding = load_speaker_embedding(folder / "voices" / "expresso" / next(
        p.name for p in (folder / "voices" / "expresso").iterdir()))
    custom = torch.randn(512, VOICE_FRAMES - 2, generator=torch.Generator().manual_seed(9))
    record = {}

    async def main():
        async with tts_server(model, record) as (_, url):
            await speak(url, TEXT.split(), "format=Pcm&temperature=0&voice=expresso/bob")
            await speak(url, TEXT.split(), "format=Pcm&temperature=0", voice_message={
                "type": "Voice", "embeddings": custom[None].flatten().tolist(), "shape": [1, 512, VOICE_FRAMES - 2]})

    asyncio.run(main())
    for stream, emb in ((0, embedding), (1, custom)):
        result, _, _ = offline(model, TEXT, GREEDY, embedding=emb)
        np.testing.assert_array_equal(np.array(record[stream]).T, result.frames[0].numpy())


def test_bad_messages_get_errors_and_the_stream_goes_on(model):
    """Not msgpack, an unknown type, a malformed voice, a Voice after text and text after Eos: one
    Error each; the stream still says its whole text (greedy: the offline frames) and the server
    serves the next stream."""
    result, _, _ = offline(model, TEXT, GREEDY)
    record = {}

    async def main():
        import websockets

        async with tts_server(model, record, max_errors=10) as (server, url):
            extra = [b"\x93garbage", msgpack.packb({"type": "Shout", "text": "hi"}),
                     msgpack.packb({"type": "Voice", "embeddings": [1.0, 2.0], "shape": [1, 512, 3]})]
            got = await speak(url, TEXT.split(), "format=PcmMessagePack&temperature=0", extra=extra)
            async with websockets.connect(f"{url}?format=PcmMessagePack", additional_headers=HEADERS) as ws:
                assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
                await ws.send("Hi")
                await ws.send(msgpack.packb({"type": "Voice", "embeddings": [0.0] * 512, "shape": [512, 1]}))
                await ws.send(msgpack.packb({"type": "Eos"}))
                await ws.send("more")
                errors = []
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
                        if m["type"] == "Error":
                            errors.append(m["message"])
            assert server.loop.tick_errors == 0 and server.health()[0] == 200
            return got, errors

    got, errors = asyncio.run(main())
    messages = [m["message"] for m in got["Error"]]
    assert len(messages) == 3 and "not a msgpack message" in messages[0]
    assert "unknown message type 'Shout'" in messages[1] and "do not fill the shape" in messages[2]
    np.testing.assert_array_equal(np.array(record[0]).T, result.frames[0].numpy())
    assert len(errors) == 2 and "Voice must come before the first text" in errors[0]
    assert "text after Eos" in errors[1]


def test_refusals_say_why(model):
    """A missing or wrong key (moshi-server's header or auth_id), a bad format or number, a voice
    that does not exist or is a path, and a full server ("no free channels"): an Error message
    then the close; the raw formats get the message as a text frame."""
    import websockets

    async def first(url, query, headers=HEADERS):
        async with websockets.connect(f"{url}?{query}", additional_headers=headers) as ws:
            data = await asyncio.wait_for(ws.recv(), 30)
            return msgpack.unpackb(data) if isinstance(data, bytes) else data

    async def main():
        async with tts_server(model, max_sessions=1, queue_size=0) as (_, url):
            out = [await first(url, "format=PcmMessagePack", headers={}),
                   await first(url, f"format=PcmMessagePack&auth_id={TOKEN}"),
                   await first(url, "format=Wav"), await first(url, "format=PcmMessagePack&temperature=nan"),
                   await first(url, "format=PcmMessagePack&voice=nobody"),
                   await first(url, "format=Pcm&voice=/etc/passwd"),
                   await first(url, "format=PcmMessagePack&seed=-1")]
            async with websockets.connect(f"{url}?format=PcmMessagePack", additional_headers=HEADERS) as ws:
                assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
                out.append(await first(url, "format=PcmMessagePack"))
            return out

    unauthorized, authorized, fmt, nan, nobody, path, seed, full = asyncio.run(main())
    assert unauthorized == {"type": "Error", "message": "unauthorized: missing or wrong token"}
    assert authorized == {"type": "Ready"}
    assert "format='Wav' is not one of Pcm, PcmMessagePack, OggOpus, OggOpusMessagePack" in fmt["message"]
    assert "must be finite" in nan["message"] and "no nobody" in nobody["message"]
    assert isinstance(path, str) and "is not a voice name" in path
    assert "seed" in seed["message"]
    assert full["message"].startswith("no free channels")


def test_serve_hosts_tts_beside_stt(folder, tmp_path):
    """`openmoshi serve --hf-repo STT --tts-model TTS`: one process, both endpoints, /health of both."""
    from stt_utils import make_stt

    stt = make_stt(tmp_path / "stt", seed=5)
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "openmoshi", "serve", "--hf-repo", str(stt), "--tts-model",
                             str(folder), "--tts-voice", "alice", "--tts-voice-repo", str(folder / "voices"),
                             "--port", str(port), "--max-sessions", "1", "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, health = time.monotonic() + 150, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
                break
            except OSError:
                time.sleep(1)
        assert health is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert set(health["models"]) == {"stt", "tts"} and health["status"] == "ok"
        got = asyncio.run(speak(f"ws://127.0.0.1:{port}/api/tts_streaming", TEXT.split(), "format=PcmMessagePack",
                                headers={}))
        assert len(got["Audio"]) > 10 and [m["text"] for m in got["Text"]] == TEXT.split()

        async def asr():
            import websockets

            async with websockets.connect(f"ws://127.0.0.1:{port}/api/asr-streaming") as ws:
                return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))

        assert asyncio.run(asr()) == {"type": "Ready"}
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_audio_prefix_model_says_what_offline_says(tmp_path):
    """`kyutai/tts-0.75b-en-public`'s way: the voice is a recording of the voice repository, encoded
    by Mimi and read as an audio prefix, guidance by batch doubling. Greedy: the frames exactly the
    offline generation's with that prefix; the prefix's frames are not sent."""
    import soundfile as sf

    from official_utils import speech
    from openmoshi.loading.tts_voices import audio_prefix

    folder = tmp_path / "prefix"
    make_tts_checkpoint(folder, "prefix", seed=5)
    (folder / "voices").mkdir()
    sf.write(folder / "voices" / "me.wav", speech(1.0).numpy(), 24000)
    model = load_tts(resolve_files(str(folder)), "cpu", torch.float32, voice_repo=str(folder / "voices"))
    prefix = audio_prefix(folder / "voices" / "me.wav", model.model.mimi)
    m = model.model
    entries = script_to_entries(m.tokenizer, [TEXT], model.frame_rate, False, 1)
    settings = TTSSettings(temp=0.0, n_q=m.lm.cfg.dep_q)
    result = generate(m.lm, model.spec, settings, [entries], [TTSHost(model, settings, None).values([], None)],
                      prefixes=[prefix])
    record = {}

    async def main():
        host = TTSHost.build(model, TTSSettings(), "me.wav")
        server = MoshiServer(m.lm, m.mimi, m.tokenizer, ServerConfig(max_sessions=2, static_dir=None), tts=host)
        server.loop.recorder = lambda seat, _p, text, audio, _v: record.setdefault(0, []).append((text, *audio.tolist()))
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        try:
            return await speak(f"ws://127.0.0.1:{sock.getsockname()[1]}/api/tts_streaming", TEXT.split(),
                               "format=PcmMessagePack&temperature=0", headers={})
        finally:
            await runner.stop()

    got = asyncio.run(main())
    np.testing.assert_array_equal(np.array(record[0]).T, result.frames[0].numpy())
    P = prefix.shape[-1]
    assert len(got["Audio"]) == result.frames.shape[-1] - model.spec.delay_steps - P
    said = [(m["text"], m["start_s"], m["stop_s"]) for m in got["Text"]]
    assert said == [tuple(w) for w in word_timings(result.scripts[0], model.frame_rate, P)]


def test_a_stream_waiting_in_line_keeps_what_it_sent(model):
    """One slot: a second client waits in line while sending its text, a bad message and Eos; once
    the first stream is over it gets Ready, the Error of its bad message, and says its whole text
    (greedy: the offline frames)."""
    result, _, _ = offline(model, TEXT, GREEDY)
    record = {}

    async def main():
        async with tts_server(model, record, max_sessions=1, queue_size=2) as (server, url):
            first = asyncio.create_task(speak(url, OTHER.split(), "format=PcmMessagePack&temperature=0"))
            while not server.active:
                await asyncio.sleep(0.01)
            second = await speak(url, TEXT.split(), "format=PcmMessagePack&temperature=0", extra=[b"\x93garbage"])
            await first
            return second

    second = asyncio.run(main())
    assert second["Ready"] == [{"type": "Ready"}] and len(second["Error"]) == 1
    assert "not a msgpack message" in second["Error"][0]["message"]
    np.testing.assert_array_equal(np.array(record[1]).T, result.frames[0].numpy())
