"""A client for the `/api/chat` websocket protocol (`openmoshi.serving.protocol`), against `openmoshi serve`
or the official Moshi servers.

Two ways to talk:
- `talk_file`: headless. A recording plays the microphone in real time (one 80 ms frame every
  80 ms, on an absolute clock so that it does not drift), and whatever comes back is recorded.
  For scripts and tests.
- `talk_live`: the sound card (the `sounddevice` package, imported only here). The speaker side
  is an adaptive jitter buffer (`jitter`): it holds back only what the network's jitter needs, and
  drops the oldest audio beyond `max_lag_s`, so that a server or network hiccup costs a skip
  instead of a delay that lasts the rest of the conversation. The microphone goes through an echo
  canceller (`aec`), what was played as its reference, unless `echo_cancel=False`.

Both measure the latency the client hears (`latency.LatencyMeter`) and return it in `TalkResult.latency`;
live, `on_latency` hears the last `LATENCY_WINDOW_S` every as long.

Connection problems end as `ClientError` with a message meant for the user.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from openmoshi.serving import protocol
from openmoshi.serving.aec import AecUnavailable, EchoCanceller, EchoPath, round_trip_samples
from openmoshi.serving.jitter import JitterBuffer
from openmoshi.serving.latency import LatencyMeter
from openmoshi.serving.opus import SAMPLE_RATE, OpusDecoder, OpusEncoder

FRAME_SIZE = 1920  # samples per 80 ms model step; the opus encoder takes whole frames
FRAME_S = FRAME_SIZE / SAMPLE_RATE
CHAT_PATH = "/api/chat"
HANDSHAKE_TIMEOUT_S = 30.0  # a server may load or warm up before it answers (or tell our place in line)
SILENCE_TIMEOUT_S = 10.0  # as the official web client: no message for this long ends the call
LATENCY_WINDOW_S = 10.0  # live: the latency is reported over this window, this often
AUTH_PARAM = "worker_auth_id"  # the official web client's name for the auth token

# The sampling settings a server reads from the query string (the official web client's names).
SAMPLING_PARAMS = (
    "text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
    "text_seed", "audio_seed", "repetition_penalty", "repetition_penalty_context",
)


RECONNECT = "the server went away; reconnect to start a new conversation"


class ClientError(RuntimeError):
    """The conversation could not start or broke off; the message says why, for the user."""


class ServerError(ClientError):
    """The server sent an error message (kind 5), e.g. busy or wrong auth token."""


@dataclass
class Transcript:
    """Text pieces as they arrive; `on_piece` is called with each (e.g. to print it)."""

    on_piece: Callable[[str], None] | None = None
    pieces: list[str] = field(default_factory=list)

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.on_piece is not None:
            self.on_piece(piece)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class TalkResult:
    audio: np.ndarray  # float32 [N] at 24 kHz: everything the server sent, in order
    text: str
    seconds_sent: float
    seconds_received: float
    seconds_dropped: float = 0.0  # live mode only: audio dropped to catch up
    errors: tuple[str, ...] = ()  # error messages the server sent after the handshake
    # LatencyMeter.summary() (p50_ms, p90_ms, first/last_third_p90_ms, chunks); live mode adds the
    # latency as heard (heard_p50_ms, heard_p90_ms: also the jitter buffer's wait and the sound card's)
    latency: dict = field(default_factory=dict)


def chat_url(url: str, params: dict[str, object] | None = None, auth_token: str | None = None) -> str:
    """The websocket URL of the chat route: `ws://host:port`, `http://host:port/`, `host:port`
    all mean `ws://host:port/api/chat`; https and wss map to wss. Settings go in the query."""
    text = url.strip()
    if "://" not in text:
        text = "ws://" + text
    parts = urllib.parse.urlsplit(text)
    scheme = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"bad URL {url!r}: the scheme must be ws, wss, http or https")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad URL {url!r}: the port is not a number between 0 and 65535") from None
    if not parts.hostname:
        raise ValueError(f"bad URL {url!r}: no host name")
    path = parts.path if parts.path not in ("", "/") else CHAT_PATH
    query = urllib.parse.parse_qsl(parts.query)
    for name, value in (params or {}).items():
        if value is not None:
            query.append((name, str(value)))
    if auth_token:
        query.append((AUTH_PARAM, auth_token))
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # IPv6 literal
        netloc = f"[{parts.hostname}]" + ("" if port is None else f":{port}")
    return urllib.parse.urlunsplit((scheme, netloc, path, urllib.parse.urlencode(query), ""))


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [(k, "***" if k == AUTH_PARAM else v) for k, v in urllib.parse.parse_qsl(parts.query)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def _connect(session, url: str, auth_token: str | None,
                   on_queue: Callable[[int, int], None] | None = None):
    """Opens the websocket and waits for the handshake; returns the websocket. A busy server may
    first keep us waiting for a slot: `on_queue(position, length)` hears each place-in-line message."""
    import aiohttp

    headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
    shown = _redact(url)
    try:
        ws = await session.ws_connect(url, headers=headers, heartbeat=None, max_msg_size=protocol.MAX_MESSAGE_BYTES)
    except aiohttp.WSServerHandshakeError as e:
        hint = {401: "wrong or missing auth token?", 403: "wrong or missing auth token?",
                404: "no chat route there: is it a Moshi server?",
                500: "the server could not take the conversation (behind Ray Serve: every replica is full), "
                     "try again later",
                503: "the server is busy: every conversation slot is taken, try again later"}.get(
            e.status, "is it a Moshi server?")
        raise ClientError(f"{shown} refused the websocket (HTTP {e.status}): {hint}") from None
    except aiohttp.ClientConnectorError as e:
        why = "connection refused (is the server running?)" if isinstance(e.os_error, ConnectionRefusedError) else e.os_error or e
        raise ClientError(f"cannot connect to {shown}: {why}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise ClientError(f"cannot connect to {shown}: {e or type(e).__name__}") from None
    try:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"{shown} sent no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s")
            msg = await ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ClientError(f"{shown} closed the connection before the handshake")
            try:
                m = protocol.parse(msg.data)
            except protocol.ProtocolError as e:
                raise ClientError(f"{shown} is not speaking the Moshi protocol: {e}") from None
            if m.kind == protocol.KIND_ERROR:
                raise ServerError(f"the server refused the conversation: {m.data}")
            if m.kind == protocol.KIND_HANDSHAKE:
                return ws
            place = protocol.queue_position(m)
            if place is not None:  # waiting in line: the server is alive, its own timeout bounds the wait
                deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
                if on_queue is not None:
                    on_queue(*place)
            # other metadata or a ping before the handshake: keep waiting
    except asyncio.TimeoutError:
        await ws.close()
        raise ClientError(f"{shown} sent no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None
    except BaseException:
        await ws.close()
        raise


async def _receive(ws, on_audio: Callable[[np.ndarray], None], transcript: Transcript,
                   errors: list[str], silence_timeout_s: float = SILENCE_TIMEOUT_S) -> None:
    """Reads server messages until the server closes; audio is decoded and handed to `on_audio`."""
    import aiohttp

    decoder = OpusDecoder()
    while True:
        try:
            msg = await ws.receive(timeout=silence_timeout_s)
        except asyncio.TimeoutError:
            raise ClientError(f"no message from the server for {silence_timeout_s:.0f} s") from None
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            code = ws.close_code
            if code not in (None, 1000, 1001, 1008, 1013, 4000, 4001) and not errors:
                # Closed without a word: the server (or the replica behind a proxy) went away.
                errors.append(f"the connection to the server was lost (close code {code}): {RECONNECT}")
            return
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise ClientError(f"connection lost ({ws.exception()}): {RECONNECT}")
        if msg.type != aiohttp.WSMsgType.BINARY:
            continue
        try:
            m = protocol.parse(msg.data)
        except protocol.ProtocolError:
            continue  # tolerate what we do not understand; the server may be newer
        if m.kind == protocol.KIND_AUDIO:
            try:
                pcm = decoder.decode(m.data)
            except ValueError:
                continue
            if len(pcm):
                on_audio(pcm)
        elif m.kind == protocol.KIND_TEXT:
            transcript.add(m.data)
        elif m.kind == protocol.KIND_ERROR:
            errors.append(m.data)


def _frames(pcm: np.ndarray) -> np.ndarray:
    """[N] -> [F, FRAME_SIZE], the last frame zero-padded."""
    n = -(-len(pcm) // FRAME_SIZE)
    out = np.zeros(n * FRAME_SIZE, np.float32)
    out[: len(pcm)] = pcm
    return out.reshape(n, FRAME_SIZE)


async def talk_file(url: str, pcm: np.ndarray, *, params: dict | None = None, auth_token: str | None = None,
                    transcript: Transcript | None = None, realtime: bool = True,
                    tail_s: float = 2.0, on_queue: Callable[[int, int], None] | None = None,
                    meter: LatencyMeter | None = None) -> TalkResult:
    """Plays `pcm` (float32 [N], 24 kHz) to the server as if spoken, then waits until as much audio
    has come back as was sent, or `tail_s` seconds more at most, and hangs up. While a busy server
    keeps us waiting for a slot, `on_queue(position, length)` hears our place in line. `meter` (one
    is made if not given) records what was sent and received when, for the latency a client hears."""
    import aiohttp

    transcript = transcript or Transcript()
    meter = LatencyMeter() if meter is None else meter
    frames = _frames(np.asarray(pcm, np.float32).reshape(-1))
    received: list[np.ndarray] = []
    errors: list[str] = []
    got = [0]
    enough = asyncio.Event()

    def on_audio(chunk: np.ndarray) -> None:
        received.append(chunk)
        got[0] += len(chunk)
        meter.received(got[0], time.monotonic())
        if got[0] >= len(frames) * FRAME_SIZE:
            enough.set()

    async with aiohttp.ClientSession() as session:
        ws = await _connect(session, chat_url(url, params, auth_token), auth_token, on_queue)
        receiver = asyncio.create_task(_receive(ws, on_audio, transcript, errors))
        encoder = OpusEncoder()
        start = time.monotonic()
        try:
            for i, frame in enumerate(frames):
                if realtime:  # absolute schedule: a late send does not push the next ones back
                    await asyncio.sleep(max(0.0, start + i * FRAME_S - time.monotonic()))
                ogg = encoder.encode(frame)
                if ogg:
                    await ws.send_bytes(protocol.encode_audio(ogg))
                    meter.sent((i + 1) * FRAME_SIZE, time.monotonic())
                if receiver.done():
                    break
            waiter = asyncio.create_task(enough.wait())
            await asyncio.wait({receiver, waiter}, timeout=tail_s, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        except (ConnectionResetError, aiohttp.ClientError) as e:
            raise ClientError(f"connection lost ({e}): {RECONNECT}") from None
        finally:
            await ws.close()
            if receiver.done():
                receiver.result()  # raises the receiver's ClientError, if any
            else:
                receiver.cancel()
    audio = np.concatenate(received) if received else np.zeros(0, np.float32)
    return TalkResult(audio, transcript.text, len(frames) * FRAME_S, len(audio) / SAMPLE_RATE,
                      errors=tuple(errors), latency=meter.summary())


# ----------------------------------------------------------------------------- live (sound card)


class _Playback(JitterBuffer):
    """The speaker's jitter buffer (`jitter.JitterBuffer`: holds at least `buffer_s`, drops the oldest
    beyond `max_lag_s`), shared with the sound card's thread."""

    def __init__(self, buffer_s: float = 0.02, max_lag_s: float = 0.32):
        super().__init__(buffer_s, max_lag_s, SAMPLE_RATE)
        self.lock = threading.Lock()

    def push(self, pcm: np.ndarray, tag: object = None) -> None:
        with self.lock:
            super().push(pcm, tag)

    def pull(self, n: int) -> np.ndarray:
        with self.lock:
            return super().pull(n)

    def take_started(self) -> list[tuple[object, int]]:
        with self.lock:
            return super().take_started()


class _Duplex:
    """The full-duplex sound card callback: plays the next block of `playback`, and hands each 80 ms
    of microphone, with the echo canceller's reference for it (what the speaker played, lined up by
    an `aec.EchoPath`), to `on_frame(mic, reference)`. The round trip comes from the first callback's
    timestamps, or `fallback_s` (the stream's latencies) where the host API gives none."""

    def __init__(self, playback: _Playback, on_frame: Callable[[np.ndarray, np.ndarray], None],
                 fallback_s: float = 0.0):
        self.playback = playback
        self.on_frame = on_frame
        self.fallback_s = fallback_s
        self.path: EchoPath | None = None
        self.mic: list[np.ndarray] = []
        self.reference: list[np.ndarray] = []
        self.pending = 0

    def __call__(self, indata, outdata, frames, time_info, status) -> None:  # sound card thread
        played = self.playback.pull(frames)
        outdata[:, 0] = played
        if self.path is None:
            self.path = EchoPath(round_trip_samples(time_info.inputBufferAdcTime, time_info.outputBufferDacTime,
                                                    self.fallback_s))
        self.reference.append(self.path.step(played, frames))
        self.mic.append(indata[:, 0].astype(np.float32, copy=True))
        self.pending += frames
        if self.pending >= FRAME_SIZE:
            mic, reference = np.concatenate(self.mic), np.concatenate(self.reference)
            for i in range(0, len(mic) - FRAME_SIZE + 1, FRAME_SIZE):
                self.on_frame(mic[i : i + FRAME_SIZE], reference[i : i + FRAME_SIZE])
            rest = len(mic) % FRAME_SIZE
            self.mic = [mic[len(mic) - rest :]] if rest else []
            self.reference = [reference[len(mic) - rest :]] if rest else []
            self.pending = rest


def _sounddevice():
    try:
        import sounddevice
    except ImportError as e:
        raise ClientError("live mode needs the 'sounddevice' package (pip install sounddevice); "
                          "or use --input/--output for files") from None
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise ClientError(f"live mode needs the PortAudio library ({e}); on Debian/Ubuntu: "
                          "apt-get install libportaudio2; or use --input/--output for files") from None
    return sounddevice


def _heard(seconds: list[float]) -> dict:
    """p50 and p90 of the latency as heard (arrival latency + jitter buffer wait + sound card output)."""
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000.0
    return {"heard_p50_ms": round(float(np.percentile(ms, 50)), 1),
            "heard_p90_ms": round(float(np.percentile(ms, 90)), 1)}


async def talk_live(url: str, *, params: dict | None = None, auth_token: str | None = None,
                    transcript: Transcript | None = None, max_lag_s: float = 0.32, buffer_s: float = 0.02,
                    record: bool = False, on_queue: Callable[[int, int], None] | None = None,
                    echo_cancel: bool = True, on_latency: Callable[[dict], None] | None = None) -> TalkResult:
    """A conversation through the default microphone and speaker, until Ctrl-C or the server ends it
    (`on_queue` as in `talk_file`). With `echo_cancel`, the speaker's echo is removed from the
    microphone (`aec`); headphones do not need it. The jitter buffer holds at least `buffer_s` and at
    most `max_lag_s`. Every `LATENCY_WINDOW_S`, `on_latency` hears that window's latency: p50_ms,
    p90_ms, heard_p50_ms, heard_p90_ms, chunks, and the jitter buffer's buffer_ms and underruns."""
    import aiohttp

    sd = _sounddevice()
    try:
        canceller = EchoCanceller() if echo_cancel else None
    except AecUnavailable as e:
        raise ClientError(str(e)) from None
    transcript = transcript or Transcript()
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue[tuple[np.ndarray, np.ndarray]] = asyncio.Queue(maxsize=64)
    playback = _Playback(buffer_s, max_lag_s)
    received: list[np.ndarray] = []
    errors: list[str] = []
    sent, got = [0], [0]
    meter = LatencyMeter()
    heard: list[float] = []  # seconds, one per chunk played
    output_s = [0.0]  # the sound card's output latency, once the stream is open

    def on_frame(frame: np.ndarray, reference: np.ndarray) -> None:  # sound card thread
        loop.call_soon_threadsafe(lambda: mic.full() or mic.put_nowait((frame, reference)))

    def on_audio(pcm: np.ndarray) -> None:
        got[0] += len(pcm)
        # Tagged with its latency on arrival: the buffer adds how long it waited until it played.
        playback.push(pcm, meter.received(got[0], time.monotonic()))
        if record:
            received.append(pcm)

    async def send_mic(ws) -> None:
        encoder = OpusEncoder()
        while True:
            frame, reference = await mic.get()
            if canceller is not None:
                frame = canceller.process(frame, reference)
            ogg = encoder.encode(frame)
            sent[0] += len(frame)
            if ogg:
                await ws.send_bytes(protocol.encode_audio(ogg))
                meter.sent(sent[0], time.monotonic())

    def played_since() -> list[float]:
        out = [tag + delay / SAMPLE_RATE + output_s[0] for tag, delay in playback.take_started()]
        heard.extend(out)
        return out

    async def report_latency() -> None:
        while True:
            await asyncio.sleep(LATENCY_WINDOW_S)
            buffer = {"buffer_ms": round(1000 * playback.target / SAMPLE_RATE), "underruns": playback.underruns}
            on_latency({**meter.recent(LATENCY_WINDOW_S, time.monotonic()), **_heard(played_since()), **buffer})

    async with aiohttp.ClientSession() as session:
        ws = await _connect(session, chat_url(url, params, auth_token), auth_token, on_queue)
        # One full-duplex stream: its input and output share a clock, which lines up the echo
        # canceller's reference with the microphone (see `aec`).
        duplex = _Duplex(playback, on_frame)
        try:
            stream = sd.Stream(samplerate=SAMPLE_RATE, channels=1, blocksize=FRAME_SIZE // 4,
                               dtype="float32", callback=duplex)
            duplex.fallback_s = float(sum(stream.latency))  # (input, output) seconds
            output_s[0] = float(stream.latency[1])
        except Exception as e:  # sounddevice.PortAudioError: no device, busy device...
            await ws.close()
            raise ClientError(f"cannot open the sound card: {e}") from None
        tasks = []
        try:
            with stream:
                tasks.append(asyncio.create_task(send_mic(ws)))
                if on_latency is not None:
                    tasks.append(asyncio.create_task(report_latency()))
                await _receive(ws, on_audio, transcript, errors)
        except (ConnectionResetError, aiohttp.ClientError) as e:
            raise ClientError(f"connection lost ({e}): {RECONNECT}") from None
        finally:
            for task in tasks:
                task.cancel()
            await ws.close()
    played_since()
    audio = np.concatenate(received) if received else np.zeros(0, np.float32)
    return TalkResult(audio, transcript.text, sent[0] / SAMPLE_RATE, len(audio) / SAMPLE_RATE,
                      seconds_dropped=playback.dropped / SAMPLE_RATE, errors=tuple(errors),
                      latency={**meter.summary(), **_heard(heard)})
