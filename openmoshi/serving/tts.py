"""`/api/tts_streaming`: moshi-server's text-to-speech protocol for one stream, on a Kyutai TTS model.

    query   voice=NAME (a voice of the server's --voice-repo; default --tts-voice), format=Pcm |
            PcmMessagePack | OggOpus (default) | OggOpusMessagePack, seed (default 42),
            temperature (default the server's, 0.6), cfg_alpha (a CFG-distilled model's coefficient)
    in      text websocket frames, or msgpack {"type": "Text", "text"}: words, as an LLM produces them
            {"type": "Voice", "embeddings": [float], "shape": [1, 512, T]}: a voice of the client's own
            (before the first text), {"type": "Eos"} or the one byte b"\\0": the text is complete
    out     msgpack formats: {"type": "Ready"} once the stream has its slot, {"type": "Audio", "pcm":
            [float32 at 24 kHz]} (PcmMessagePack) or {"type": "OggOpus", "data"} (OggOpusMessagePack)
            per 80 ms frame, {"type": "Text", "text", "start_s", "stop_s"} per word said, once its end
            is known, {"type": "Error", "message"}; raw formats: the float32 little-endian samples
            (Pcm) or the Ogg/Opus stream's pages (OggOpus) only, errors as text frames.
    The server closes the websocket after the stream's last frame (moshi-server's way of saying
    the speech is over). POST {"text", "voice"} to the same path: the speech as a streamed WAV
    (`wav_header` then 16-bit samples), as moshi-server's.

Each text message is split into words at white space (`tts_script.script_to_entries`: breaks
`<break time="1.5s"/>` too), as moshi-server splits them: send whole words. The model loop
(`serving.tts_loop`) steps a stream only when it holds the words its step may read (its lookahead
included) or its text is complete, so a text streamed word by word is said exactly as the same
text sent at once. Word times are those of the offline `openmoshi tts` (`lm.tts.word_timings`),
which moshi-server's are within one frame of. The stream's voice is conditioned twice ([voice,
voice], main and other speaker), as moshi-server does.

Bad messages (not msgpack, an unknown type, text after Eos, a malformed voice) get an Error
message and the stream goes on (the session closes after `max_errors`); a bad query is refused
before the stream starts. A full server answers "no free channels" (after its waiting line).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

import msgpack
import numpy as np
import torch

from openmoshi.errors import UserError
from openmoshi.lm.tts import TTSError, TTSSettings, condition_values
from openmoshi.lm.tts_script import script_to_entries
from openmoshi.serving.params import one_value, parse_number, quoted
from openmoshi.serving.tts_loop import Finished, Said, Speak, Words

if TYPE_CHECKING:
    from openmoshi.serving.loop import Frame
    from openmoshi.serving.session import Session

PATH = "/api/tts_streaming"
FORMATS = ("Pcm", "PcmMessagePack", "OggOpus", "OggOpusMessagePack")
DEFAULT_FORMAT = "OggOpus"
DEFAULT_SEED = 42  # moshi-server's
MAX_TEXT_CHARS = 10_000  # one message's text
MAX_EARLY_MESSAGES = 4096  # messages kept while waiting for a slot
MAX_VOICE_VALUES = 512 * 2000  # a client's own voice embedding: values at most
SAMPLE_RATE = 24000
_VOICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/ ]*")
_END = object()  # outbox item: the stream is over, close


class TtsMessageError(ValueError):
    """A client message this protocol cannot take; the text goes back in an Error message."""


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A WAV header of unknown length (sizes 0xFFFFFFFF, as moshi-server streams it): mono 16-bit PCM."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def wav_samples(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


# ----------------------------------------------------------------------------- the model's side


@dataclass
class TTSHost:
    """What a TTS server needs beyond its model loop: the model (`inference.tts.TTSModel`), the
    generation settings, the default voice, and the voices loaded so far (name -> condition)."""

    model: object  # inference.tts.TTSModel
    settings: TTSSettings
    default_voice: str | None
    cross_len: int = 0  # the state's speaker-condition length (max_speakers x voice frames)
    max_prefix: int = 0  # frames of the longest audio prefix a slot holds
    voices: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model, settings: TTSSettings, default_voice: str | None) -> "TTSHost":
        """Loads the default voice (a multi-speaker model needs one: it sets the condition length)."""
        spec = model.spec
        host = cls(model, settings, default_voice)
        if spec.multi_speaker:
            if not default_voice:
                raise UserError("a TTS server needs a default voice: --tts-voice NAME (from --voice-repo)")
            frames = host.voice(default_voice)[0][0].shape[1]
            host.cross_len = spec.max_speakers * frames
        else:
            host.max_prefix = int(30 * model.frame_rate)  # `audio_prefix`'s longest
            if default_voice:
                host.voice(default_voice)
        return host

    def voice(self, name: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(speaker embeddings [E, T], audio prefix codes or None) of a voice of the voice repo,
        loaded once. UserError (VoiceError) when it cannot be."""
        if name in self.voices:
            return self.voices[name]
        from openmoshi.loading.tts_voices import audio_prefix, load_speaker_embedding, resolve_tts_voice

        if not _VOICE_NAME.fullmatch(name) or ".." in name.split("/") or len(name) > 200:
            raise TtsMessageError(f"voice {quoted(name)} is not a voice name: give the name of a voice of the "
                                  "server's voice repository (letters, digits, '_', '-', '.', '/')")
        model = self.model
        path = resolve_tts_voice(name, model.model.config, model.voice_repo)
        if model.spec.multi_speaker:
            voice = ([load_speaker_embedding(path)], None)
        else:
            voice = ([], audio_prefix(path, model.model.mimi))
        self.voices[name] = voice
        return voice

    def values(self, embeddings: list[torch.Tensor], cfg_alpha: float | None) -> dict:
        spec = self.model.spec
        cfg = (cfg_alpha if cfg_alpha is not None else self.settings.cfg_coef) if spec.cfg_values else None
        return condition_values(spec, embeddings * 2 if embeddings else (), cfg)


@dataclass(frozen=True)
class TtsRequest:
    """A stream's query, checked: its voice, output format and settings."""

    voice: str | None
    format: str
    seed: int
    temperature: float | None
    cfg_alpha: float | None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> "TtsRequest":
        fmt = one_value(query, "format") or DEFAULT_FORMAT
        if fmt not in FORMATS:
            raise UserError(f"query parameter format={quoted(fmt)} is not one of {', '.join(FORMATS)}")
        numbers = {}
        for name, integer, low, high in (("seed", True, 0, 2 ** 62 - 1), ("temperature", False, 0.0, 100.0),
                                          ("cfg_alpha", False, 0.0, 100.0)):
            raw = one_value(query, name)
            if raw is None:
                continue
            value = parse_number(name, raw, integer)
            if not low <= value <= high:
                raise UserError(f"query parameter {name}={quoted(raw)} is out of range: between {low} and {high}")
            numbers[name] = value
        return cls(one_value(query, "voice"), fmt, int(numbers.get("seed", DEFAULT_SEED)),
                   numbers.get("temperature"), numbers.get("cfg_alpha"))

    def speak(self, host: TTSHost, embeddings=None, prefix=None) -> Speak:
        """The loop command that starts this stream (seat None: the server sets it); UserError for a
        voice or setting the model cannot take."""
        spec = host.model.spec
        if embeddings is None and prefix is None:
            name = self.voice or host.default_voice
            if name is None:
                if spec.multi_speaker:
                    raise UserError("no voice: give the query parameter voice=NAME")
            else:
                embeddings, prefix = host.voice(name)
        if not spec.cfg_values and self.cfg_alpha is not None and self.cfg_alpha != host.settings.cfg_coef:
            raise UserError(f"cfg_alpha={self.cfg_alpha:g}: this model's guidance coefficient is the server's "
                            f"({host.settings.cfg_coef:g}, serve --tts-cfg-coef)")
        values = host.values(list(embeddings or ()), self.cfg_alpha)
        sampling = None
        if self.temperature is not None:
            sampling = replace(host.settings, temp=self.temperature).sampling()
        return Speak(None, values, prefix, sampling, (self.seed, self.seed))


def _voice_embedding(msg: dict, host: TTSHost) -> torch.Tensor:
    """A Voice message's embedding -> [E, T] float32."""
    emb, shape = msg.get("embeddings"), msg.get("shape")
    bad = TtsMessageError("Voice needs embeddings (a list of floats) and shape ([1, 512, T] or [512, T])")
    if not isinstance(emb, (list, tuple)) or not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 3:
        raise bad
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise bad
    if len(emb) > MAX_VOICE_VALUES or int(np.prod(shape)) != len(emb):
        raise TtsMessageError(f"Voice: {len(emb)} values do not fill the shape {list(shape)}")
    try:
        x = torch.tensor(np.asarray(emb, dtype=np.float32))
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not torch.isfinite(x).all():
        raise TtsMessageError("Voice.embeddings holds NaN or infinite values")
    x = x.view(*shape)
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise bad
        x = x[0]
    frames = host.cross_len // max(host.model.spec.max_speakers, 1)
    if x.shape[0] != 512 or x.shape[1] > frames:
        raise TtsMessageError(f"Voice: shape {list(shape)}: this server takes [1, 512, T] with T <= {frames}")
    return x


# ----------------------------------------------------------------------------- the protocol


def _single(query, name: str) -> bool:
    try:
        one_value(query, name)
        return True
    except UserError:
        return False


class TtsProtocol:
    """One TTS stream's protocol on a session (see the module doc)."""

    model_kind = "tts"

    def __init__(self, host: TTSHost | None, query: Mapping[str, str] | None = None):
        self.host, self.query = host, query or {}
        fmt = one_value(self.query, "format") if _single(self.query, "format") else None
        self.format = fmt if fmt in FORMATS else DEFAULT_FORMAT  # refusals of a bad query: msgpack or not
        self.messages = self.format.endswith("MessagePack") or fmt not in FORMATS and fmt is not None
        self.request: TtsRequest | None = None
        self.encoder = None
        self.session: Session | None = None
        self.started = False  # a text has come: the voice is fixed
        self.complete = False  # Eos came
        self.early: list[bytes | str] = []  # messages while waiting for a slot

    @classmethod
    def for_server(cls, server, query: Mapping[str, str]) -> "TtsProtocol":
        return cls(getattr(server, "tts", None), query)

    def join(self) -> Speak:
        """The stream's start, from its query; UserError for a bad query or voice (refused)."""
        self.request = TtsRequest.from_query(self.query)
        self.format, self.messages = self.request.format, self.request.format.endswith("MessagePack")
        if self.format.startswith("OggOpus"):
            from openmoshi.serving.opus import OpusEncoder

            self.encoder = OpusEncoder()
        return self.request.speak(self.host)

    def attach(self, session: "Session") -> None:
        self.session = session

    def refusal(self, message: str) -> bytes | str:
        if "busy" in message:
            message = f"no free channels: {message}"
        return pack({"type": "Error", "message": message}) if self.messages else message

    def greeting(self) -> bytes | None:
        return pack({"type": "Ready"}) if self.messages else None

    def started_stream(self) -> None:
        """The stream has its slot: what came while waiting is applied (a bad message among it gets
        its Error, in order, as it would have)."""
        early, self.early = self.early, []
        for data in early:
            try:
                self._apply(data)
            except (TtsMessageError, UserError) as e:
                self.session.errors += 1
                self.session.emit(("raw", self.refusal(str(e))))

    def place_in_line(self, position: int, length: int) -> None:
        return None  # moshi-server's protocol has no such message

    async def while_waiting(self, data: bytes | str) -> None:
        if len(self.early) < MAX_EARLY_MESSAGES:  # a client waiting in line cannot fill memory
            self.early.append(data)

    async def report(self, message: str, kind: str, **details) -> None:
        await self.session.send(self.refusal(message))

    def waits_for_model(self) -> bool:
        """After Eos the client may send nothing until the speech is over: not idle."""
        return self.complete

    async def handle(self, data: bytes | str) -> None:
        try:
            self._apply(data)
        except (TtsMessageError, UserError) as e:
            await self.session.error(str(e), "protocol")

    def _apply(self, data: bytes | str) -> None:
        if isinstance(data, str):
            return self._text(data)
        if data == b"\0":
            return self._eos()
        try:
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several types
            raise TtsMessageError(f"not a msgpack message ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(msg, dict) or "type" not in msg:
            raise TtsMessageError('a message is a msgpack map with a "type" field')
        kind = msg["type"]
        if kind == "Text":
            if not isinstance(msg.get("text"), str):
                raise TtsMessageError("Text.text must be a string")
            return self._text(msg["text"])
        if kind == "Eos":
            return self._eos()
        if kind == "Voice":
            return self._voice(msg)
        raise TtsMessageError(f"unknown message type {str(kind)[:40]!r}: expected Text, Voice or Eos")

    def _text(self, text: str) -> None:
        if self.complete:
            raise TtsMessageError("text after Eos is not said: the stream's text was complete")
        if len(text) > MAX_TEXT_CHARS:
            raise TtsMessageError(f"a text message holds at most {MAX_TEXT_CHARS} characters, got {len(text)}")
        model = self.host.model
        entries = script_to_entries(model.model.tokenizer, [text], model.frame_rate,
                                    model.spec.multi_speaker and not self.started, self.host.settings.padding_between)
        if not entries:
            return
        self.started = True
        self.session.server.loop.submit(Words(self.session.seat, tuple(entries)))

    def _eos(self) -> None:
        if not self.complete:
            self.complete = True
            self.session.server.loop.submit(Words(self.session.seat, (), complete=True))

    def _voice(self, msg: dict) -> None:
        if self.started:
            raise TtsMessageError("Voice must come before the first text")
        if not self.host.model.spec.multi_speaker:
            raise TtsMessageError("this TTS model is conditioned on an audio prefix: it takes voices by name only")
        speak = self.request.speak(self.host, embeddings=[_voice_embedding(msg, self.host)])
        s = self.session
        s.join = replace(speak, seat=s.seat)
        s.server.loop.submit(s.join)  # the stream restarts with that voice (nothing was said yet)

    # ------------------------------------------------------------------ from the model loop

    def frame(self, frame: "Frame") -> None:
        self.session.emit(("audio", frame.pcm))

    def event(self, e) -> None:
        if isinstance(e, Said):
            if self.messages:
                self.session.emit(("text", e))
        elif isinstance(e, Finished):
            self.session.emit(_END)

    def wire(self, item) -> bytes | str | None:
        s = self.session
        if item is _END:
            s.closed_reason = "speech finished"
            s.finish()
            return None
        kind, value = item
        if kind == "raw":
            return value
        if kind == "text":
            return pack({"type": "Text", "text": value.text, "start_s": value.start, "stop_s": value.stop})
        s.frames_out += 1
        fmt = self.format
        if fmt == "Pcm":
            return np.ascontiguousarray(value, dtype="<f4").tobytes()
        if fmt == "PcmMessagePack":
            return msgpack.packb({"type": "Audio", "pcm": value.tolist()}, use_bin_type=True, use_single_float=True)
        page = self.encoder.encode(value)
        if not page:
            return None
        return pack({"type": "OggOpus", "data": page}) if self.messages else page


# ----------------------------------------------------------------------------- POST: a streamed WAV


class PostSocket:
    """`server.Socket` for a POST request: the client "sends" its text then Eos; what the stream
    sends (raw float32 PCM; errors as text) goes to `out`, None once closed."""

    def __init__(self, text: str):
        import asyncio

        self.closed = False
        self._in = [text, b"\0"]
        self._closed = asyncio.Event()
        self.out: "asyncio.Queue[bytes | str | None]" = asyncio.Queue()

    async def send(self, data: bytes | str) -> None:
        if self.closed:
            raise ConnectionError("the request is over")
        await self.out.put(data)

    async def receive(self) -> bytes | str | None:
        if self._in:
            return self._in.pop(0)
        await self._closed.wait()
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self._closed.set()
            await self.out.put(None)


def _post_body(raw: bytes) -> tuple[str, str | None]:
    import json

    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise UserError('the body must be JSON: {"text": "...", "voice": "NAME"}') from None
    if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"].strip():
        raise UserError('the body must be JSON with a non-empty "text" (and optionally "voice")')
    voice = body.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise UserError('"voice" must be a voice name (a string)')
    if len(body["text"]) > MAX_TEXT_CHARS:
        raise UserError(f'"text" holds at most {MAX_TEXT_CHARS} characters, got {len(body["text"])}')
    return body["text"], voice or None


async def post_wav(server, request):
    """POST {text, voice} -> the speech as a streamed WAV (moshi-server's POST). The stream runs as a
    websocket stream does (auth, slots, waiting line); a refusal before any audio is an HTTP error."""
    import asyncio

    from starlette.responses import JSONResponse, StreamingResponse

    try:
        text, voice = _post_body(await request.body())
    except UserError as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    query = {k: v for k, v in request.query_params.items() if k not in ("format", "voice")}
    query["format"] = "Pcm"
    if voice is not None:
        query["voice"] = voice
    socket = PostSocket(text)
    peer = request.client.host if request.client else "?"
    task = asyncio.create_task(server.chat(socket, query, request.headers, peer, TtsProtocol.for_server(server, query)))
    first = await socket.out.get()
    if first is None or isinstance(first, str):  # refused (or nothing said)
        await task
        message = first or "the stream ended before any audio"
        status = 401 if "unauthorized" in message else 503 if "busy" in message or "try again" in message else 400
        return JSONResponse({"error": message}, status_code=status)

    async def body():
        try:
            yield wav_header()
            item = first
            while item is not None:
                if isinstance(item, bytes):
                    yield wav_samples(np.frombuffer(item, dtype="<f4"))
                item = await socket.out.get()
        finally:
            await socket.close()
            await task

    return StreamingResponse(body(), media_type="audio/wav")
