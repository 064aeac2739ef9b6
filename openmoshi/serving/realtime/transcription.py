"""The user's words on `/v1/realtime`: a Kyutai STT stream beside each Realtime session that asks
for transcription (`serve --stt-model`), turned into `conversation.item.input_audio_transcription.*`.

    Realtime session ──PCM (decoded, 24 kHz)──> Transcriber ──in-process pipe──> STT server's session
                                                   ^                               (its own seat, line)
                          delta / completed  <─────┴── words, steps (SttSeat, on the STT's model loop)

The STT stream is a session of the STT server like any `/api/asr-streaming` client's: a seat in
its slots, its waiting line (audio meanwhile is kept, as `asr` does), its auth and metrics. It
hears exactly the PCM the client sends to Moshi (after G.711 and resampling), from the moment
transcription is switched on; Moshi's own silence filling is not heard. When no seat can be had,
or the STT stream fails, the session gets one `error` event (and `.failed` for the items waiting
for their transcript); Moshi's conversation goes on untouched.

Words and items. Positions count samples of this STT stream's audio (after its silence prefix).
An input audio item spans the audio appended between the previous commit (or clear, or the start
of transcription) and its own commit, whether the server VAD or `input_audio_buffer.commit` made
it. `.completed` goes once the STT has done the steps that read every frame of the item plus its
delay (`asr.AsrProtocol`'s Marker rule) and no word that started inside the item is still open
(at most MAX_OPEN_STEPS more steps). A word belongs to the item whose span holds its start time
(moshi-server's `Word.start_time`, `lm.stt.WordTracker`) while that item is not complete; a word
whose first piece comes after that is about later audio (its start time is only the STT's last
word boundary, which can be older) and belongs to the span after. Words in cleared audio belong
to none. Each word is one `.delta` (a space before every word but the item's first, so the deltas
joined are the transcript), sent as soon as both the word and its item exist, with `start_time`:
seconds of input audio since the session began (the STT's start time). When the client sends no audio after a commit (push to
talk), silence goes into the STT stream so that the transcript completes; that silence is
subtracted from the times reported.

With `semantic_vad`, each step's pause probability (`prs[2]`, as Unmute reads it) goes to the
Realtime session (`RealtimeProtocol.heard_pause`), which ends the user's turn on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from openmoshi.lm.stt import WordEvent, WordTracker
from openmoshi.serving.loop import FRAME_SIZE
from openmoshi.serving.phases import FRAME_S, JITTER_S
from openmoshi.serving.realtime import events as E

log = logging.getLogger("openmoshi.serving.realtime")

RATE = 24000
MAX_OPEN_STEPS = 25  # a word still open 2 s past its item's end does not hold the transcript back
MAX_LOOSE_WORDS = 4096  # words of audio not yet committed kept (about half an hour of speech); the oldest go
KEEPALIVE_S = 5.0  # the pipe says "still here" this often (at most) without audio: the STT server's idle timeout
KEEPALIVE = b""
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


def parse_setting(value, param: str) -> dict | None:
    """`audio.input.transcription` (or the beta `input_audio_transcription`): null (off) or an object
    whose `model`, `language` and `prompt` are strings when given (any model name: the server has
    one STT model; `language` and `prompt` are echoed, Kyutai STT needs neither)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise E.EventError(f"'{param}' must be null or an object", "invalid_type", param)
    for key in ("model", "language", "prompt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise E.EventError(f"'{param}.{key}' must be a string", "invalid_type", f"{param}.{key}")
    return {"model": value.get("model") or "kyutai-stt", "language": value.get("language"),
            "prompt": value.get("prompt") or ""}


@dataclass
class _Item:
    id: str
    start: int  # samples of the STT stream's audio
    end: int
    words: list[str] = field(default_factory=list)


class _Pipe:
    """The STT session's `Socket`, in process: PCM arrays in, (kind, text) tuples out."""

    def __init__(self, transcriber: "Transcriber", keepalive: float):
        self.transcriber, self.keepalive = transcriber, keepalive
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.closed = False

    async def send(self, data) -> None:
        self.transcriber.on_message(*data)

    async def receive(self):
        if self.closed:
            return None
        try:
            data = await asyncio.wait_for(self.inbox.get(), self.keepalive)
        except asyncio.TimeoutError:
            return KEEPALIVE
        if data is None:
            self.closed = True
        return data

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait(None)  # a receive under way returns


class SttSeat:
    """The wire protocol of a Transcriber's session on the STT server (see `session.WireProtocol`):
    what `asr.AsrProtocol` does for a websocket client, handing words and steps to the Transcriber."""

    model_kind = "stt"
    fills_silence = False  # the STT hears the client's audio only (and the Transcriber's flushes)

    def __init__(self, server, transcriber: "Transcriber"):
        self.timing, self.tokenizer, self.transcriber = server.stt, server.tokenizer, transcriber
        self.words = WordTracker(server.stt, *server.text_ids)
        self.early: list[np.ndarray] = []  # audio that came while waiting for a seat
        self.session = None

    def attach(self, session) -> None:
        self.session = session

    def refusal(self, message: str):
        return "error", message

    def greeting(self):
        self.session.push_pcm(np.zeros(self.timing.prefix_frames * FRAME_SIZE, np.float32))
        for pcm in self.early:
            self.session.push_pcm(pcm)
        self.early = []
        return "ready", ""

    def place_in_line(self, position: int, length: int) -> None:
        return None

    async def while_waiting(self, data) -> None:
        if isinstance(data, np.ndarray):
            self.early.append(data)

    async def handle(self, data) -> None:
        if isinstance(data, np.ndarray):
            self.session.push_pcm(data)

    async def report(self, message: str, kind: str, **details) -> None:
        self.transcriber.on_message("error", message)

    def frame(self, frame) -> None:
        try:  # on the STT server's dispatch: a failure here must reach neither its other streams nor Moshi
            for e in self.words.push(frame.token):
                if isinstance(e, WordEvent):
                    self.transcriber.on_word(self.tokenizer.decode(list(e.tokens)), e.start)
            open_start = self.words.last_stop if self.words.word else None
            self.transcriber.on_step(self.words.steps, open_start, frame.prs)
        except Exception:
            log.exception("transcription_error")
            self.transcriber.on_message("error", "internal error of the transcription")

    def wire(self, item) -> None:
        return None  # nothing goes through the outbox: the Transcriber is called directly


class Transcriber:
    """One Realtime session's transcription (see the module doc). `protocol`: the RealtimeProtocol
    (its `emit`, `items` and `session`); `origin`: input samples the session had before this."""

    def __init__(self, server, protocol, origin: int):
        self.server, self.protocol, self.origin = server, protocol, origin
        self.timing = server.stt
        # The Realtime session's liveness is Moshi's side's: the STT stream never idles out by itself.
        self.pipe = _Pipe(self, min(KEEPALIVE_S, server.config.idle_timeout / 2))
        self.seat = SttSeat(server, self)
        self.samples = 0  # STT audio sent (the Transcriber's silence included, the prefix not)
        self.inserted: list[tuple[int, int]] = []  # (position, samples) of the silence the Transcriber added
        self.boundary = 0  # where the uncommitted audio starts
        self.done_until = 0  # the end of the last item completed
        self.pending: deque[_Item] = deque()  # committed, transcript not complete
        self.loose: list[tuple[str, int, int]] = []  # words of uncommitted audio: (text, start, where it goes)
        self.steps = 0
        self.open_start: int | None = None
        self.started = self.stopped = False
        self.last_audio = time.monotonic()
        self.task: asyncio.Task | None = None
        self.flusher: asyncio.Task | None = None

    def start(self) -> None:
        token = self.server.config.auth_token
        headers = {"kyutai-api-key": token} if token else {}
        peer = f"{self.protocol.session.peer} (transcription)"
        self.task = asyncio.create_task(self.server.chat(self.pipe, {}, headers, peer, self.seat))
        self.task.add_done_callback(self._ended)
        self.flusher = asyncio.create_task(self._flush())

    def close(self) -> None:
        """The Realtime session ends, or turns transcription off: the STT stream leaves its seat."""
        self.stopped = True
        self.pipe.inbox.put_nowait(None)
        if self.flusher is not None:
            self.flusher.cancel()

    # ------------------------------------------------------------------ from the Realtime session

    def push(self, pcm: np.ndarray) -> None:
        if self.stopped:
            return
        self.last_audio = time.monotonic()
        self.pipe.inbox.put_nowait(pcm)
        self.samples += pcm.size

    def commit(self, item_id: str) -> None:
        if self.stopped:
            return
        item = _Item(item_id, self.boundary, self.samples)
        self.boundary = self.samples
        self.pending.append(item)
        mine = [word for word in self.loose if word[2] < item.end]
        self.loose = [word for word in self.loose if word[2] >= item.end]
        for text, told, _ in mine:
            self._delta(item, text, told)
        self._complete()

    def clear(self) -> None:
        self.boundary, self.loose = self.samples, []

    # ------------------------------------------------------------------ from the STT stream

    def on_message(self, kind: str, text: str) -> None:
        if kind == "ready":
            self.started = True
        elif not self.stopped:
            self._fail(text)

    def on_word(self, text: str, start: float) -> None:
        told = round(start * RATE)
        at = max(told, self.done_until)  # a complete item takes no more words: the span after does
        item = next((i for i in self.pending if i.start <= at < i.end), None)
        if item is not None:
            self._delta(item, text, told)
        elif at >= self.boundary:
            self.loose.append((text, told, at))
            if len(self.loose) > MAX_LOOSE_WORDS:  # a client that never commits cannot fill memory
                del self.loose[0]
        # else: a word of cleared audio: no item takes it

    def on_step(self, steps: int, open_start: float | None, prs: tuple | None = None) -> None:
        self.steps = steps
        self.open_start = None if open_start is None else round(open_start * RATE)
        self._complete()
        at = (steps - self.timing.skip) * FRAME_SIZE  # the audio this step's outputs are about
        if prs is not None and len(prs) > 2 and at >= 0 and not self.stopped:
            self.protocol.heard_pause(prs[2], round(1000 * self._input_seconds(at)))

    # ------------------------------------------------------------------ events

    def _needed(self, item: _Item) -> int:
        """Steps after which every frame of the item has been read and its delay has passed."""
        return self.timing.prefix_frames + math.ceil(item.end / FRAME_SIZE) + 1 + self.timing.delay_tokens

    def _complete(self) -> None:
        while self.pending and not self.stopped:
            item, needed = self.pending[0], self._needed(self.pending[0])
            held = self.open_start is not None and self.open_start < item.end
            if self.steps < needed or (held and self.steps < needed + MAX_OPEN_STEPS):
                return
            self.pending.popleft()
            self.done_until = item.end
            transcript = "".join(item.words)
            kept = self.protocol.items.get(item.id)
            if kept is not None and kept.get("role") == "user":
                kept["content"] = [{**kept["content"][0], "transcript": transcript}]
            self.protocol.emit(E.server_event(COMPLETED, item_id=item.id, content_index=0, transcript=transcript,
                                              usage={"type": "duration",
                                                     "seconds": round((item.end - item.start) / RATE, 3)}))

    def _delta(self, item: _Item, text: str, at: int) -> None:
        delta = text if not item.words else " " + text
        item.words.append(delta)
        self.protocol.emit(E.server_event(DELTA, item_id=item.id, content_index=0, delta=delta,
                                          start_time=round(self._input_seconds(at), 3)))

    def _input_seconds(self, at: int) -> float:
        """A position of the STT stream as seconds of the session's input audio."""
        shift = sum(min(n, max(0, at - p)) for p, n in self.inserted)
        return (self.origin + at - shift) / RATE

    def _fail(self, message: str) -> None:
        self.close()
        self.protocol.emit(E.error(f"input audio transcription stopped: {message}; the conversation goes on",
                                   "transcription_unavailable", kind="server_error"))
        for item in self.pending:
            self.protocol.emit(E.server_event(FAILED, item_id=item.id, content_index=0, error={
                "type": "server_error", "code": "transcription_unavailable", "message": message, "param": None}))
        self.pending.clear()

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("transcription_error", exc_info=task.exception())
        if not self.stopped:
            self._fail("the transcription stream ended")

    async def _flush(self) -> None:
        """While an item waits for its transcript and the client sends no audio, silence goes in:
        at once what the item's last frame and the delay need, then a frame a tick while one of its
        words is still open."""
        while True:
            await asyncio.sleep(FRAME_S)
            if not self.pending or not self.started or time.monotonic() - self.last_audio < FRAME_S + JITTER_S:
                continue
            item = self.pending[0]
            short = (math.ceil(item.end / FRAME_SIZE) + self.timing.delay_tokens) * FRAME_SIZE - self.samples
            caught_up = self.steps >= self.timing.prefix_frames + self.samples // FRAME_SIZE + 1
            n = short if short > 0 else (FRAME_SIZE - self.samples % FRAME_SIZE) if caught_up else 0
            if n:
                self.inserted.append((self.samples, n))
                self.pipe.inbox.put_nowait(np.zeros(n, np.float32))
                self.samples += n
