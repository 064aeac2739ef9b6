"""`/api/asr-streaming`: moshi-server's speech-to-text protocol (msgpack both ways) for one session.

    in   {"type": "Audio", "pcm": [float32 at 24 kHz, any count]}    audio, in chunks of any size
         {"type": "OggOpus", "data": <bytes of an Ogg/Opus stream>}
         {"type": "Marker", "id": int}     echoed once the audio sent before it has been transcribed
         {"type": "Init"}                  accepted and ignored (moshi-server's batched mode sends it itself)
    out  {"type": "Ready"}                 the stream has its slot: send audio
         {"type": "Word", "text", "start_time"}, {"type": "EndWord", "stop_time"}     (seconds)
         {"type": "Step", "step_idx", "prs", "buffered_pcm"}   every step of a model with extra heads
         {"type": "Marker", "id"}, {"type": "Error", "message"}

The stream (`openmoshi.lm.stt`): `stt_config`'s silence prefix goes in first, then the client's
audio, cut into 80 ms frames; the model loop reads the first frame twice (its `stream` clock) and
steps this stream whenever it has a frame, as fast as the steps go: audio that comes faster than
real time waits in the seat's inbox, never dropped (`Step.buffered_pcm`: samples waiting, the
partial frame included). Words and times are moshi-server's rule (`lm.stt.WordTracker`); a Step's
`prs` are each extra head's probability of its first class (Unmute reads `prs[2]` as the pause
prediction), `step_idx` the steps this stream has done. A Marker comes back once the stream has
done the steps that read every whole frame sent before it, plus the delay (`asr_delay_in_tokens`):
the words of that audio have come out. A client keeps sending (silence) for the marker to come.

Bad messages (not msgpack, an unknown type, samples that are not a list of numbers, broken Ogg
data) get an Error message; the stream goes on (the session closes after `max_errors` of them).
Audio sent while waiting for a slot is kept and goes in at the start.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from openmoshi.lm.stt import EndWord, SttTiming, WordEvent, WordTracker
from openmoshi.serving.loop import FRAME_SIZE

if TYPE_CHECKING:
    from openmoshi.serving.loop import Frame
    from openmoshi.serving.session import Session

PATH = "/api/asr-streaming"
IN_TYPES = ("Audio", "OggOpus", "Marker", "Init")


class AsrMessageError(ValueError):
    """A client message this protocol cannot take; the text goes back in an Error message."""


def pack(message: dict) -> bytes:
    """A message as moshi-server writes it: a map with a "type" tag. Floats go as float64: times
    are (f64 in moshi-server), and `prs` hold float32 values, exactly."""
    return msgpack.packb(message, use_bin_type=True)


def error(message: str) -> bytes:
    return pack({"type": "Error", "message": message})


def parse(data: bytes | str) -> tuple[str, object]:
    """A client message -> ("pcm", float32 [N]) | ("ogg", bytes) | ("marker", id) | ("init", None).
    AsrMessageError says what is wrong."""
    if isinstance(data, str):
        raise AsrMessageError("text websocket frames are not part of the protocol: send msgpack in binary frames")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise AsrMessageError(f"not a msgpack message ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise AsrMessageError('a message is a msgpack map with a "type" field')
    kind = msg["type"]
    if kind == "Audio":
        return "pcm", _samples(msg.get("pcm"))
    if kind == "OggOpus":
        data = msg.get("data")
        if not isinstance(data, (bytes, bytearray)):
            raise AsrMessageError("OggOpus.data must be the bytes (msgpack bin) of an Ogg/Opus stream")
        return "ogg", bytes(data)
    if kind == "Marker":
        marker = msg.get("id")
        if not isinstance(marker, int) or isinstance(marker, bool):
            raise AsrMessageError("Marker.id must be an integer")
        return "marker", marker
    if kind == "Init":
        return "init", None
    raise AsrMessageError(f"unknown message type {str(kind)[:40]!r}: expected one of {', '.join(IN_TYPES)}")


def _samples(pcm) -> np.ndarray:
    bad = AsrMessageError("Audio.pcm must be a list of float32 samples (mono, 24 kHz)")
    if not isinstance(pcm, (list, tuple)) or any(isinstance(x, (bool, str, bytes, list, dict)) or x is None
                                                 for x in pcm):
        raise bad
    try:
        x = np.asarray(pcm, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if x.ndim != 1:
        raise bad
    if not np.isfinite(x).all():
        raise AsrMessageError("Audio.pcm holds NaN or infinite samples")
    return x


class AsrProtocol:
    """One STT stream's protocol on a session (see the module doc). `timing`: None for a server
    whose model is not speech to text (this protocol then only refuses)."""

    model_kind = "stt"

    def __init__(self, timing: SttTiming | None, tokenizer=None, pad_id: int = 3, end_pad_id: int = 0):
        self.timing, self.tokenizer = timing, tokenizer
        self.words = WordTracker(timing, pad_id, end_pad_id) if timing is not None else None
        self.decoder = None  # an OpusDecoder once OggOpus comes
        self.markers: deque[tuple[int, int]] = deque()  # (steps the stream must have done, id)
        self.early: list[tuple[str, object]] = []  # what came while waiting for a slot
        self.frames = 0  # whole frames sent to the model loop (the silence prefix included)
        self.session: Session | None = None

    @classmethod
    def for_server(cls, server) -> "AsrProtocol":
        return cls(server.stt, server.tokenizer, *server.text_ids)

    def attach(self, session: "Session") -> None:
        self.session = session

    refusal = staticmethod(error)

    def greeting(self) -> bytes:
        """The stream starts: the silence prefix and what came while waiting go in, then Ready."""
        self._push(np.zeros(self.timing.prefix_frames * FRAME_SIZE, np.float32))
        for kind, value in self.early:
            self._apply(kind, value)
        self.early = []
        return pack({"type": "Ready"})

    def place_in_line(self, position: int, length: int) -> None:
        return None  # moshi-server's protocol has no such message: the client waits for Ready

    async def while_waiting(self, data: bytes | str) -> None:
        try:
            kind, value = self._decoded(*parse(data))
        except AsrMessageError as e:
            await self.session.send(error(str(e)))
            return
        self.early.append((kind, value))

    async def report(self, message: str, kind: str, **details) -> None:
        await self.session.send(error(message))

    async def handle(self, data: bytes | str) -> None:
        try:
            kind, value = self._decoded(*parse(data))
        except AsrMessageError as e:
            await self.session.error(str(e), "protocol")
            return
        self._apply(kind, value)

    def _decoded(self, kind: str, value):
        """Ogg/Opus bytes -> their PCM (decoded in order, as they come)."""
        if kind != "ogg":
            return kind, value
        from openmoshi.serving.opus import OpusDecoder, OpusError

        if self.decoder is None and not value.startswith(b"OggS"):  # a stream reader waits for more of anything
            raise AsrMessageError("OggOpus.data must be an Ogg/Opus stream: its first bytes are not an Ogg page")
        self.decoder = self.decoder or OpusDecoder()
        try:
            return "pcm", self.decoder.decode(value)
        except OpusError as e:
            raise AsrMessageError(str(e)) from None

    def _apply(self, kind: str, value) -> None:
        if kind == "pcm":
            self._push(value)
        elif kind == "marker":
            # The first frame is read twice: the step that reads frame f is step f + 2 (counted from 1).
            self.markers.append((self.frames + 1 + self.timing.delay_tokens, value))
            self._markers()

    def _push(self, pcm: np.ndarray) -> None:
        self.frames += self.session.push_pcm(pcm)

    # ------------------------------------------------------------------ from the model loop

    def frame(self, frame: "Frame") -> None:
        """One step of this stream: Step, then its words, then the markers it completes."""
        s = self.session
        events = self.words.push(frame.token)
        if frame.prs is not None:
            buffered = len(s.seat.inbox) * FRAME_SIZE + s.pending.shape[0]
            s.emit({"type": "Step", "step_idx": self.words.steps, "prs": list(frame.prs), "buffered_pcm": buffered})
        for e in events:
            if isinstance(e, WordEvent):
                s.emit({"type": "Word", "text": self._decode(e.tokens), "start_time": e.start})
            elif isinstance(e, EndWord):
                s.emit({"type": "EndWord", "stop_time": e.stop})
        self._markers()

    def _decode(self, tokens: tuple[int, ...]) -> str:
        try:
            return self.tokenizer.decode(list(tokens))
        except Exception:  # ids outside a mismatched tokenizer's vocabulary: never fail the dispatch
            return ""

    def _markers(self) -> None:
        while self.markers and self.markers[0][0] <= self.words.steps:
            self.session.emit({"type": "Marker", "id": self.markers.popleft()[1]})

    def wire(self, item: dict) -> bytes:
        self.session.frames_out += item["type"] == "Step"
        return pack(item)
