"""One client's conversation on the event loop, whatever its wire protocol: its seat in the model
loop, its outbox, its timeouts, and the one frame assembler.

    session = Session(server, ws, peer, protocol)       # protocol: ChatProtocol(), RealtimeProtocol(...)
    session.push_pcm(pcm)        # any length of 24 kHz PCM: whole 80 ms frames go to the model loop
    session.emit(item, droppable=True)                   # output, sent in order by the sender task
    session.restart(prompt, persona) / session.configure(sampling)
    session.inject(text, tag) / session.cancel_inject(tag)   # the model says a text (issue 22)

The protocol turns client messages into calls on the session (`handle`), model frames into outbox
items (`frame`) and items into websocket messages (`wire`); the session knows none of it. A client
that reads slowly loses its oldest droppable items (audio), never the others; one that sends
nothing for `idle_timeout`, or whose sends block for `send_timeout`, is closed; after `max_errors`
bad messages it is closed. None of this touches the other conversations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Mapping, Protocol

import numpy as np

from openmoshi.serving.loop import FRAME_SIZE, CancelInject, Configure, Frame, Inject, Join, Seat
from openmoshi.lm.inject import InjectError, inject_tokens
from openmoshi.serving.phases import FRAME_S, JITTER_S

log = logging.getLogger("openmoshi.serving.server")

# Websocket close codes (RFC 6455, and private-use ones).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # shutting down, idle, or gone
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011  # the model loop failed on this conversation
CLOSE_TRY_AGAIN_LATER = 1013  # busy
CLOSE_UNAUTHORIZED = 4001
CLOSE_BAD_REQUEST = 4000
SEND_ERRORS = (asyncio.TimeoutError, ConnectionError)  # a send that failed: the client is gone or stuck
LOGGED_ERRORS = 3  # bad messages logged per conversation (all are counted in metrics)


class Socket(Protocol):
    """A websocket as the server uses it (`app.py` adapts the framework's)."""

    closed: bool

    async def send(self, data: bytes | str) -> None:
        """Sends one message, binary (bytes) or text (str); ConnectionError when the client is gone."""

    async def receive(self) -> bytes | str | None:
        """The next message: bytes, str (a text frame), or None once the connection is closed."""

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        ...


class WireProtocol(Protocol):
    """What a wire protocol gives a session (see `chat.ChatProtocol`, `realtime.session.RealtimeProtocol`)."""

    def attach(self, session: "Session") -> None: ...
    def refusal(self, message: str) -> bytes | str: ...  # a refusal or shutdown message
    def greeting(self) -> bytes | str: ...  # the conversation starts
    def place_in_line(self, position: int, length: int) -> bytes | str | None: ...
    async def while_waiting(self, data: bytes | str) -> None: ...  # a message before the start
    async def handle(self, data: bytes | str) -> None: ...  # a message during the conversation
    async def report(self, message: str, kind: str, **details) -> None: ...  # a bad message, to the client
    def frame(self, frame: Frame) -> None: ...  # one model frame (its pcm, text piece, token, prs)
    def wire(self, item: Any) -> bytes | str | None: ...  # an outbox item as a message (None: nothing yet)
    # A protocol may have `session_ended()`, called once its session has ended (it closes streams of its own).
    # A protocol sets `fills_silence = True` when its clients may send no audio and still expect the
    # model to go on (the Realtime API): the session then fills their silences (`Session.fill_silence`).


def event(name: str, level: int = logging.INFO, **fields) -> None:
    """A structured log line: the event name plus key/value fields (rendered by the CLI's formatter)."""
    log.log(level, name, extra={"fields": fields})


class Session:
    """`server`: the `server.MoshiServer` (its config, metrics, model loop and personas)."""

    def __init__(self, server, ws: Socket, peer: str, protocol: WireProtocol,
                 query: Mapping[str, str] | None = None):
        self.server, self.ws, self.peer, self.protocol = server, ws, peer, protocol
        self.query = query or {}
        self.loop = asyncio.get_running_loop()
        self.ready = self.loop.create_future()
        self.outbox: deque[tuple[Any, bool]] = deque()
        self.droppable = 0  # droppable items in the outbox
        self.out_event = asyncio.Event()
        self.pending = np.zeros(0, dtype=np.float32)  # PCM not yet a whole frame
        self.last_audio = time.monotonic()  # when the client's audio last came (`fill_silence`)
        self.errors = self.dropped = self.frames_out = 0
        self.waited = 0.0  # seconds in the waiting line
        self.seat: Seat | None = None
        self.join: Join | None = None  # what the seat was opened with (a restart repeats it)
        self.closed_reason = "client closed"
        self.closing: asyncio.Task | None = None  # telling the client the model loop ended it
        protocol.attach(self)

    # ------------------------------------------------------------------ from the model loop (event loop side)

    def on_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def on_frame(self, pcm: np.ndarray, text: str | None, token: int = -1, prs: tuple | None = None,
                 inject: int | None = None) -> None:
        self.protocol.frame(Frame(self.seat, pcm, text, token, prs, inject))

    def on_ended(self, message: str) -> None:
        """The model loop ended this conversation: before it started, the start fails with
        SlotFailed (see MoshiServer.serve); after, the client is told and the connection closed."""
        if not self.ready.done():
            self.ready.set_exception(SlotFailed(message))
        elif not self.ws.closed:
            self.closing = asyncio.create_task(self.close_with_error(message))

    # ------------------------------------------------------------------ to the model loop

    def push_pcm(self, pcm: np.ndarray) -> int:
        """Any length of PCM: its whole frames go to the model loop, the rest waits; returns frames."""
        if not pcm.size:
            return 0
        self.last_audio = time.monotonic()
        x = np.concatenate([self.pending, pcm]) if self.pending.size else pcm
        whole = x.shape[0] - x.shape[0] % FRAME_SIZE
        if whole:
            self.server.loop.push(self.seat, x[:whole].reshape(-1, FRAME_SIZE))
        self.pending = x[whole:]
        return whole // FRAME_SIZE

    async def fill_silence(self) -> None:
        """For a protocol whose clients may send no audio (`fills_silence`): while none has come for
        a frame (and jitter), one frame of silence a frame goes in, so the model goes on as the
        client expects. A client that streams audio gets none: the model loop never makes up input."""
        silence = np.zeros((1, FRAME_SIZE), dtype=np.float32)
        while True:
            await asyncio.sleep(FRAME_S)
            if time.monotonic() - self.last_audio > FRAME_S + JITTER_S and not self.seat.inbox:
                self.server.loop.push(self.seat, silence)

    def restart(self, prompt=None, persona: tuple | None = None, keep_prompt: bool = True) -> None:
        """The model's side starts afresh (with a new persona prompt when given)."""
        join = self.join
        if prompt is not None or not keep_prompt:
            join = Join(join.seat, join.sampling, join.seeds, prompt, persona)
        self.join = join
        self.pending = self.pending[:0]
        self.server.loop.submit(join)

    def configure(self, sampling) -> None:
        """New sampling settings from the next frame on; the conversation goes on."""
        self.join = Join(self.join.seat, sampling, self.join.seeds, self.join.prompt, self.join.persona)
        self.server.loop.submit(Configure(self.seat, sampling))

    def inject(self, text: str, tag: int) -> int:
        """Queues `text` for the model to say in its own voice (`lm.inject`); its frames carry `tag`.
        Returns the frames it takes; InjectError for a text it cannot say."""
        if not self.server.lm_cfg.dep_q:
            raise InjectError("this model does not speak (it has no audio output)")
        tokens = inject_tokens(self.server.tokenizer, text, self.server.lm_cfg)
        self.server.loop.submit(Inject(self.seat, tuple(tokens), tag))
        return len(tokens)

    def cancel_inject(self, tag: int | None = None) -> None:
        """Drops what is left of injection `tag` (None: of every one); the model's own words resume."""
        self.server.loop.submit(CancelInject(self.seat, tag))

    # ------------------------------------------------------------------ output

    def emit(self, item: Any, droppable: bool = False) -> None:
        """Queues an item for the sender; beyond `outbox_frames` droppable items, the oldest goes."""
        self.outbox.append((item, droppable))
        if droppable:
            self.droppable += 1
            if self.droppable > self.server.config.outbox_frames:
                self._drop_oldest()
        self.out_event.set()

    def _drop_oldest(self) -> None:
        for i, (_, droppable) in enumerate(self.outbox):
            if droppable:
                del self.outbox[i]
                self.droppable -= 1
                self.dropped += 1
                self.server.metrics.inc("openmoshi_frames_dropped_total", direction="out")
                return

    def discard(self, keep) -> None:
        """Removes the queued items for which `keep(item)` is False (e.g. a cancelled response's audio)."""
        kept = [(item, d) for item, d in self.outbox if keep(item)]
        self.droppable = sum(d for _, d in kept)
        self.outbox.clear()
        self.outbox.extend(kept)

    async def send(self, data: bytes | str) -> None:
        await asyncio.wait_for(self.ws.send(data), self.server.config.send_timeout)

    async def sender(self) -> None:
        try:
            while True:
                await self.out_event.wait()
                self.out_event.clear()
                while self.outbox:
                    item, droppable = self.outbox.popleft()
                    self.droppable -= droppable
                    data = self.protocol.wire(item)
                    if data is not None:
                        await self.send(data)
        except SEND_ERRORS as e:
            # A send that blocks or fails: the client is gone or stuck. Closing ends the receiver.
            self.closed_reason = f"send failed: {type(e).__name__}"
            await self.ws.close(CLOSE_GOING_AWAY)

    def finish(self) -> None:
        """Closes the connection once what was sent before is out (a stream that is over, e.g. a
        TTS's speech): the client reads every message, then the close."""
        if self.closing is None:
            self.closing = asyncio.create_task(self.ws.close(CLOSE_NORMAL))

    # ------------------------------------------------------------------ errors

    async def error(self, message: str, kind: str, **details) -> None:
        """A bad message: the protocol tells the client, the session counts it and closes after
        `max_errors` of them."""
        self.errors += 1
        self.server.metrics.inc("openmoshi_errors_total", kind=kind)
        # A few lines per conversation: a client sending garbage must not flood the log (a blocked
        # log pipe would stall every conversation). The count is in its `conversation_end` line.
        if self.errors <= LOGGED_ERRORS:
            event("bad_message", logging.WARNING, peer=self.peer, kind=kind, message=message[:200],
                  **({"more": "further bad messages of this conversation are counted, not logged"}
                     if self.errors == LOGGED_ERRORS else {}))
        try:
            await self.protocol.report(message, kind, **details)
        except SEND_ERRORS:
            pass
        if self.errors >= self.server.config.max_errors:
            self.closed_reason = "too many bad messages"
            await self.ws.close(CLOSE_POLICY_VIOLATION, "too many bad messages")

    async def close_with_error(self, message: str, code: int = CLOSE_INTERNAL_ERROR,
                               reason: str = "internal error") -> None:
        self.closed_reason = "model error" if code == CLOSE_INTERNAL_ERROR else reason
        try:
            await self.send(self.protocol.refusal(message))
        except SEND_ERRORS:
            pass
        await self.ws.close(code, reason)


class SlotFailed(Exception):
    """The model loop ended this conversation (a failed tick or command); the text is for its client."""
