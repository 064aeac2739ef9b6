"""The real-time server: `/api/chat` speaks the official binary protocol (see `protocol`), many
conversations share one model through the `Batcher`, plus `/health`, `/metrics` and the web UI.

This module is the server's logic, independent of any web framework: a conversation is fed the
messages of a `Socket` (send bytes or text, receive bytes or text, close). `/v1/realtime` (the
OpenAI Realtime API, `realtime.session`) is another kind of `Conversation` on the same slots,
waiting line, auth and metrics: it overrides the protocol's own messages (`Conversation.greeting`,
`handle`, ...). `app.py` makes it an ASGI
application (Starlette, run by uvicorn for `openmoshi serve`, or by Ray Serve across machines).

Per conversation, on the event loop:

    websocket ──parse──> audio: Ogg/Opus ──OpusDecoder──> PCM frames ──> Batcher inbox (bounded)
                         control restart: reset the slot; ping: ping back; bad input: error reply
    Batcher (worker thread) ──on_frame──> outbox (bounded, oldest dropped) ──sender task──>
        PCM ──OpusEncoder──> audio message, text piece ──> text message

A client that arrives while every slot is taken waits in a bounded line, first come first served
(`waiting`), told its place by metadata messages until a slot frees; then its conversation starts
with the handshake as usual. A conversation that is refused (bad token, line full, waited too long,
shutting down, bad query parameters) gets an error message (kind 5), then a clean websocket close.
Bad messages get an error message and the conversation goes on; after `max_errors` of them it is
closed. A client that does not read has its oldest output dropped; one that sends nothing for
`idle_timeout`, or whose sends block for `send_timeout`, is closed. None of this touches the other
conversations.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from openmoshi.serving import protocol
from openmoshi.serving.batcher import TICK_SLACK, Batcher, Slot
from openmoshi.serving.metrics import Metrics
from openmoshi.serving.opus import OpusDecoder, OpusEncoder, OpusError
from openmoshi.serving.params import sampling_from_query, seeds_from_query  # noqa: F401  (the server's edge)
from openmoshi.serving.personas import Personas
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.serving.waiting import ADMITTED, LEFT, STOPPING, TIMED_OUT, Ticket, WaitingLine, wait_turn

log = logging.getLogger("openmoshi.serving.server")

WEB_DIR = Path(__file__).resolve().parent / "web"
# Websocket close codes (RFC 6455, and private-use ones).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # shutting down, idle, or gone
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011  # the model loop failed on this conversation
CLOSE_TRY_AGAIN_LATER = 1013  # busy
CLOSE_UNAUTHORIZED = 4001
CLOSE_BAD_REQUEST = 4000
SEND_ERRORS = (asyncio.TimeoutError, ConnectionError)  # a send that failed: the client is gone or stuck
SHUTDOWN_MESSAGE = "the server is shutting down: reconnect to start a new conversation"
STALL_SECONDS = 10.0  # a model loop that has not come round for this long is hung
LOGGED_ERRORS = 3  # bad messages logged per conversation (all are counted in metrics)
INTERNAL_ERROR_MESSAGE = "internal error while handling your message: the conversation is closed; reconnect"


class SlotFailed(Exception):
    """The model loop ended this conversation (a failed tick or command); the text is for its client."""


class Socket(Protocol):
    """A websocket as the server uses it (`app.py` adapts the framework's)."""

    closed: bool

    async def send(self, data: bytes | str) -> None:
        """Sends one message, binary (bytes) or text (str); ConnectionError when the client is gone."""

    async def receive(self) -> bytes | str | None:
        """The next message: bytes, str (a text frame), or None once the connection is closed."""

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        ...


@dataclass(frozen=True)
class ServerConfig:
    max_sessions: int = 4
    auth_token: str | None = None
    idle_timeout: float = 30.0  # seconds without any client message before closing
    send_timeout: float = 10.0  # seconds a single send may block before the client counts as dead
    heartbeat: float = 10.0  # websocket ping interval; a missing pong closes the connection
    outbox_frames: int = 25  # 2 s of output kept for a client that reads slowly
    max_errors: int = 20  # bad messages tolerated per conversation
    ready_timeout: float = 10.0  # waiting for the model loop to reset a slot
    shutdown_grace: float = 10.0  # seconds given to conversations to end on shutdown
    static_dir: Path | None = WEB_DIR
    cuda_graph: bool | None = None  # the model loop as CUDA graphs: None on CUDA (see openmoshi.accel.cuda_graph)
    cfg_coef: float = 1.0  # classifier-free guidance of a conditioned model (needs `negative`)
    queue_size: int = 16  # clients waiting for a slot when all are taken; more are refused (0: no line)
    queue_timeout: float = 120.0  # seconds a client waits for a slot before it is refused
    queue_update: float = 2.0  # seconds between place-in-line messages (official client: silent 10 s = gone)
    clock: str = "realtime"  # "input": tick only on every slot's next frame, no silence inserted (tests, reproducible runs)
    voice_dir: Path | None = None  # PersonaPlex voices (`voice_prompt` query parameter, GET /api/voices)


def event(name: str, level: int = logging.INFO, **fields) -> None:
    """A structured log line: the event name plus key/value fields (rendered as JSON by the CLI)."""
    log.log(level, name, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """One line a person reads: the time, the event, its fields; the one line that matters most
    said as a sentence ("ready: open http://localhost:8998/ in a browser")."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", {}))
        name = record.getMessage()
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        if name == "listening":
            text = f"ready: open {fields.pop('url')} in a browser (websocket {fields.pop('websocket', '/api/chat')})"
        else:
            text = name.replace("_", " ")
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        rest = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{clock} {level}{text}" + (f"  {rest}" if rest else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# ----------------------------------------------------------------------------- query parameters

def _token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    header = headers.get("authorization", "") or headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return query.get("worker_auth_id") or None


def _same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# ----------------------------------------------------------------------------- one conversation


class Conversation:
    """The event-loop side of one websocket conversation. Its protocol's own messages come from
    `encode_error`, `greeting`, `place_in_line`, `while_waiting` and `handle`, which another
    protocol overrides (`realtime.session.RealtimeConversation`)."""

    encode_error = staticmethod(protocol.encode_error)  # a refusal or shutdown message

    def __init__(self, server: "MoshiServer", ws: Socket, peer: str, query: Mapping[str, str] | None = None):
        self.server, self.ws, self.peer, self.query = server, ws, peer, query or {}
        self.loop = asyncio.get_running_loop()
        self.ready = self.loop.create_future()
        self.outbox: deque = deque()
        self.out_event = asyncio.Event()
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder()
        self.pending = np.zeros(0, dtype=np.float32)  # PCM not yet a whole frame
        self.errors = 0
        self.dropped = 0
        self.frames_out = 0
        self.waited = 0.0  # seconds in the waiting line
        self.slot: Slot | None = None
        self.closed_reason = "client closed"
        self.closing: asyncio.Task | None = None  # telling the client the model loop ended it

    # Called from the worker thread.
    def on_ready(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.ready.done() or self.ready.set_result(None))

    def on_frame(self, pcm: np.ndarray, text: str | None) -> None:
        self.loop.call_soon_threadsafe(self._deliver, pcm, text)

    def on_error(self, message: str) -> None:
        self.loop.call_soon_threadsafe(self._model_failed, message)

    def _model_failed(self, message: str) -> None:
        """The model loop ended this conversation: before it started, the start fails with
        SlotFailed (see MoshiServer.chat); after, the client is told and the connection closed."""
        if not self.ready.done():
            self.ready.set_exception(SlotFailed(message))
        elif not self.ws.closed:
            self.closing = asyncio.create_task(self.close_with_error(message))

    async def close_with_error(self, message: str) -> None:
        self.closed_reason = "model error"
        try:
            await self.send(self.encode_error(message))
        except SEND_ERRORS:
            pass
        await self.ws.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _deliver(self, pcm: np.ndarray, text: str | None) -> None:
        self.outbox.append(("audio", pcm))
        if text:
            self.outbox.append(("text", text))
        while len(self.outbox) > self.server.config.outbox_frames:
            self.outbox.popleft()  # the client cannot keep up: drop the oldest output
            self.dropped += 1
            self.server.metrics.inc("openmoshi_frames_dropped_total", direction="out")
        self.out_event.set()

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(self.ws.send(data), self.server.config.send_timeout)

    def wire(self, queued) -> bytes | str | None:
        """The message of one outbox entry (None: nothing to send yet); another protocol overrides it."""
        kind, value = queued
        if kind == "audio":
            self.frames_out += 1
            ogg = self.encoder.encode(value)
            return protocol.encode_audio(ogg) if ogg else None
        return protocol.encode_text(value)

    async def sender(self) -> None:
        try:
            while True:
                await self.out_event.wait()
                self.out_event.clear()
                while self.outbox:
                    data = self.wire(self.outbox.popleft())
                    if data is not None:
                        await self.send(data)
        except SEND_ERRORS as e:
            # A send that blocks or fails: the client is gone or stuck. Closing ends the receiver.
            self.closed_reason = f"send failed: {type(e).__name__}"
            await self.ws.close(CLOSE_GOING_AWAY)

    async def error(self, message: str, kind: str) -> None:
        """Reports a bad message to the client; closes after too many."""
        self.errors += 1
        self.server.metrics.inc("openmoshi_errors_total", kind=kind)
        # A few lines per conversation: a client sending garbage must not flood the log (a blocked
        # log pipe would stall every conversation). The count is in its `conversation_end` line.
        if self.errors <= LOGGED_ERRORS:
            event("bad_message", logging.WARNING, peer=self.peer, kind=kind, message=message,
                  **({"more": "further bad messages of this conversation are counted, not logged"}
                     if self.errors == LOGGED_ERRORS else {}))
        try:
            await self.send(protocol.encode_error(message))
        except SEND_ERRORS:
            pass
        if self.errors >= self.server.config.max_errors:
            self.closed_reason = "too many bad messages"
            await self.ws.close(CLOSE_POLICY_VIOLATION, "too many bad messages")

    def greeting(self) -> bytes:
        return protocol.encode_handshake()

    def place_in_line(self, position: int, length: int) -> bytes | None:
        return protocol.encode_queue_position(position, length)

    async def while_waiting(self, data: bytes | str) -> None:
        """A message while waiting for a slot. Pings are answered; audio goes through the decoder,
        to keep its Ogg stream in step, and is dropped: it would be stale by the start."""
        if isinstance(data, str):
            return
        try:
            m = protocol.parse(data)
            if m.kind == protocol.KIND_AUDIO:
                self.decoder.decode(m.data)
            elif m.kind == protocol.KIND_PING:
                await self.send(protocol.encode_ping())
        except (protocol.ProtocolError, OpusError):
            pass  # the conversation has not started: nothing to report yet

    async def handle(self, data: bytes | str) -> None:
        if isinstance(data, str):
            await self.error("text websocket frames are not part of the protocol: send binary messages", "protocol")
            return
        try:
            msg = protocol.parse(data)
        except protocol.ProtocolError as e:
            await self.error(str(e), "protocol")
            return
        if msg.kind == protocol.KIND_AUDIO:
            try:
                pcm = self.decoder.decode(msg.data)
            except OpusError as e:
                await self.error(str(e), "opus")
                return
            if pcm.size:
                pcm = np.concatenate([self.pending, pcm])
                whole = pcm.shape[0] - pcm.shape[0] % self.server.batcher.frame_size
                self.server.batcher.push(self.slot, pcm[:whole])
                self.pending = pcm[whole:]
        elif msg.kind == protocol.KIND_CONTROL:
            if msg.data == protocol.CONTROL_RESTART:
                self.server.batcher.restart(self.slot)
                self.pending = self.pending[:0]
            event("control", peer=self.peer, code=protocol.CONTROL_NAMES[msg.data])
        elif msg.kind == protocol.KIND_PING:
            await self.send(protocol.encode_ping())  # answered at once: the UI measures the round trip
        elif msg.kind in (protocol.KIND_TEXT, protocol.KIND_ERROR):
            await self.error(f"{msg.name} messages go from server to client only", "protocol")
        # Handshake and metadata from the client need no answer.


# ----------------------------------------------------------------------------- the server


class MoshiServer:
    def __init__(self, lm, mimi, tokenizer, config: ServerConfig = ServerConfig(),
                 sampling: SamplingConfig = SamplingConfig(), condition: dict | None = None,
                 negative: dict | None = None):
        self.config = config
        self.sampling = sampling
        self.metrics = Metrics()
        self.metrics.max_sessions = config.max_sessions
        for direction in ("in", "out"):
            self.metrics.inc("openmoshi_frames_dropped_total", 0, direction=direction)
        self.metrics.inc("openmoshi_errors_total", 0, kind="protocol")
        self.metrics.inc("openmoshi_queue_timeouts_total", 0)
        self.batcher = Batcher(lm, mimi, tokenizer, config.max_sessions, sampling, self.metrics, condition,
                               config.cuda_graph, config.cfg_coef, negative, config.clock)
        self.personas = Personas(lm, mimi, tokenizer, config.voice_dir)
        self.conversations: set[Conversation] = set()
        self.line = WaitingLine(config.queue_size, self.metrics.set_waiting)
        self.draining = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Starts the model loop (on CUDA: captures its graphs, seconds) before any conversation."""
        loop = asyncio.get_running_loop()

        def slot_freed() -> None:  # worker thread
            try:
                loop.call_soon_threadsafe(self._admit)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        def gave_up() -> None:  # worker thread: the model loop died too often
            try:
                loop.call_soon_threadsafe(self.failed.set)
            except RuntimeError:
                pass

        self.failed = asyncio.Event()  # set when the model loop is given up: the process should exit
        self.batcher.on_free = slot_freed
        self.batcher.on_fatal = gave_up
        self.batcher.start()
        await asyncio.to_thread(self.batcher.ready.wait)
        event("server_started", max_sessions=self.config.max_sessions)

    async def drain(self) -> None:
        """Stops taking conversations, lets the open ones end for `shutdown_grace`, closes the rest."""
        self.draining = True
        event("draining", active=len(self.conversations), waiting=len(self.line))
        self.line.wake_all()  # waiters see `draining` and are told to go
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.conversations and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for conv in list(self.conversations):
            conv.closed_reason = "server shutdown"
            try:
                await conv.send(conv.encode_error(SHUTDOWN_MESSAGE))
            except SEND_ERRORS:
                pass
            await conv.ws.close(CLOSE_GOING_AWAY, "server shutdown")

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)
        event("server_stopped")

    # ------------------------------------------------------------------ routes

    def problem(self) -> str | None:
        """Why this server cannot serve (its model loop crashed or hangs), None when it can."""
        if self.batcher.crashed:
            return "the model loop crashed"
        if self.batcher.stalled(STALL_SECONDS):
            return f"the model loop has not moved for {STALL_SECONDS:g} s"
        return None

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of /health: 200 while conversations can start, 503 otherwise."""
        problem = self.problem()
        status = ("crashed" if self.batcher.crashed else "stalled") if problem else "draining" if self.draining else "ok"
        b = self.batcher
        body = {"status": status, "active": b.active, "max_sessions": self.config.max_sessions,
                "waiting": len(self.line), "queue_size": self.config.queue_size,
                "model_loop": {"restarts": b.restarts, "failed_ticks": b.tick_errors,
                               "failed_commands": b.command_errors, "last_error": b.last_error,
                               **({"problem": problem} if problem else {})}}
        return (200 if status == "ok" else 503), body

    async def _refuse(self, ws: Socket, message: str, code: int, reason: str, peer: str,
                      encode=protocol.encode_error) -> None:
        self.metrics.inc("openmoshi_rejected_total", reason=reason)
        event("refused", logging.WARNING, peer=peer, reason=reason)
        try:
            await asyncio.wait_for(ws.send(encode(message)), self.config.send_timeout)
        except SEND_ERRORS:
            pass
        await ws.close(code, reason)

    async def chat(self, ws: Socket, query: Mapping[str, str], headers: Mapping[str, str], peer: str,
                   kind: type[Conversation] = Conversation) -> None:
        """One client of /api/chat (or, with another `kind`, of another protocol on the same slots),
        its websocket accepted, from the first message to the close."""
        token = self.config.auth_token
        if token is not None and not _same_token(_token_from(headers, query), token):
            return await self._refuse(ws, "unauthorized: missing or wrong token", CLOSE_UNAUTHORIZED, "auth", peer,
                                      kind.encode_error)
        if self.draining:
            return await self._refuse(ws, "the server is shutting down", CLOSE_GOING_AWAY, "draining", peer,
                                      kind.encode_error)
        try:
            sampling = sampling_from_query(query, self.sampling)
            seeds = seeds_from_query(query)
            prompt, persona = await self.personas.prompt(query)
        except ValueError as e:
            return await self._refuse(ws, f"bad request: {e}", CLOSE_BAD_REQUEST, "bad_query", peer,
                                      kind.encode_error)
        except Exception:  # a bug: its traceback in the log, a short error to this client only
            log.exception("conversation_error", extra={"fields": {"peer": peer}})
            return await self._refuse(ws, INTERNAL_ERROR_MESSAGE, CLOSE_INTERNAL_ERROR, "internal", peer,
                                      kind.encode_error)
        problem = self.problem()
        if problem is not None:
            return await self._refuse(ws, f"the server cannot serve right now ({problem}): try again later",
                                      CLOSE_TRY_AGAIN_LATER, "unavailable", peer, kind.encode_error)
        conv = kind(self, ws, peer, query)

        def open_slot() -> Slot | None:
            return self.batcher.open(sampling, conv.on_ready, conv.on_frame, seeds, prompt, persona, conv.on_error)

        conv.slot = None if len(self.line) else open_slot()  # nobody overtakes those who wait
        if conv.slot is None:
            ticket = self.line.join(open_slot)
            if ticket is None:
                full = f" and the waiting line is full ({len(self.line)})" if self.config.queue_size else ""
                return await self._refuse(ws, f"the server is busy: all {self.config.max_sessions} conversations "
                                          f"are taken{full}, try again later", CLOSE_TRY_AGAIN_LATER, "busy", peer,
                                          kind.encode_error)
            conv.slot = await self._wait_in_line(conv, ticket)
            if conv.slot is None:
                return
        self.conversations.add(conv)
        self.metrics.inc("openmoshi_conversations_total")
        started = time.monotonic()
        sender = None
        try:
            if prompt is None:
                await asyncio.wait_for(conv.ready, self.config.ready_timeout)
            else:
                await self._run_prompt(conv, prompt)
            event("conversation_start", peer=peer, slot=conv.slot.index, waited=round(conv.waited, 2),
                  sampling=sampling.__dict__)
            await conv.send(conv.greeting())
            sender = asyncio.create_task(conv.sender())
            await self._receive(conv)
        except asyncio.TimeoutError:
            conv.closed_reason = "timeout"
        except ConnectionError as e:  # the client vanished while we were sending
            conv.closed_reason = f"connection lost: {type(e).__name__}"
        except SlotFailed as e:  # the model loop could not start it
            await conv.close_with_error(str(e))
        finally:
            self.batcher.close(conv.slot)
            self.conversations.discard(conv)
            if sender is not None:
                sender.cancel()
            await ws.close()
            event("conversation_end", peer=peer, slot=conv.slot.index, reason=conv.closed_reason,
                  seconds=round(time.monotonic() - started, 2), frames_in=conv.slot.frames_in,
                  frames_out=conv.frames_out, dropped=conv.dropped, errors=conv.errors)

    async def _run_prompt(self, conv: Conversation, prompt) -> None:
        """Waits for the slot's persona prompt phase (at worst one frame per 80 ms tick), answering
        the client's pings meanwhile (the official client gives up after 10 s of silence)."""
        listener = asyncio.create_task(self._listen_while_waiting(conv))
        try:
            done, _ = await asyncio.wait({conv.ready, listener}, timeout=self.config.ready_timeout
                                         + prompt.frames * TICK_SLACK, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            await asyncio.wait({listener})  # its ws.receive() must end before the conversation's
        if conv.ready not in done:
            if listener in done:
                raise ConnectionError("the client left during its persona prompt")
            raise asyncio.TimeoutError
        conv.ready.result()  # SlotFailed when the model loop ended it

    def _admit(self) -> None:
        """A slot may have freed: the first waiters take it."""
        if not self.draining:
            self.line.admit()

    async def _wait_in_line(self, conv: Conversation, ticket: Ticket) -> Slot | None:
        """Waits for the client's turn, telling it its place; returns its slot. Returns None when it
        left, waited `queue_timeout` or the server is shutting down: the client has then been told
        and closed. A slot given to a client that left at that moment is closed again."""
        cfg, ws = self.config, conv.ws
        started = time.monotonic()
        event("queued", peer=conv.peer, position=self.line.position(ticket), waiting=len(self.line))
        self.line.admit()  # a slot may have freed just before this client joined
        listener = asyncio.create_task(self._listen_while_waiting(conv))

        async def tell(position: int, length: int) -> None:
            message = conv.place_in_line(position, length)
            if message is not None:
                await conv.send(message)

        outcome = LEFT
        try:
            outcome = await wait_turn(self.line, ticket, tell, listener, cfg.queue_timeout, cfg.queue_update,
                                      lambda: self.draining)
        finally:
            if ticket.slot is not None and outcome != ADMITTED:
                self.batcher.close(ticket.slot)
            listener.cancel()
            await asyncio.wait({listener})  # its ws.receive() must end before the conversation's
        conv.waited = time.monotonic() - started
        if outcome == ADMITTED:
            return ticket.slot
        if outcome == TIMED_OUT:
            self.metrics.inc("openmoshi_queue_timeouts_total")
            await self._refuse(ws, f"no conversation slot freed up within {cfg.queue_timeout:g} s: the server "
                               "is busy, try again later", CLOSE_TRY_AGAIN_LATER, "queue_timeout", conv.peer,
                               conv.encode_error)
        elif outcome == STOPPING:
            await self._refuse(ws, "the server is shutting down", CLOSE_GOING_AWAY, "draining", conv.peer,
                               conv.encode_error)
        else:
            event("queue_left", peer=conv.peer, seconds=round(conv.waited, 2))
            await ws.close()
        return None

    async def _listen_while_waiting(self, conv: Conversation) -> None:
        """Reads a waiting client until it leaves (`Conversation.while_waiting` sees each message)."""
        ws = conv.ws
        while True:
            data = await ws.receive()
            if data is None:
                return  # closed
            try:
                await conv.while_waiting(data)
            except SEND_ERRORS:
                return  # cannot send: gone

    async def _receive(self, conv: Conversation) -> None:
        ws = conv.ws
        while not ws.closed:
            try:
                data = await asyncio.wait_for(ws.receive(), self.config.idle_timeout)
            except asyncio.TimeoutError:
                conv.closed_reason = "idle timeout"
                await conv.error(f"no message for {self.config.idle_timeout:g} s: closing", "idle")
                await ws.close(CLOSE_GOING_AWAY, "idle timeout")
                return
            if data is None:
                return  # the client closed (or the connection broke)
            try:
                await conv.handle(data)
            except SEND_ERRORS:
                raise
            except Exception:  # a bug: its traceback in the log, a short error to this client only
                log.exception("conversation_error", extra={"fields": {"peer": conv.peer}})
                self.metrics.inc("openmoshi_errors_total", kind="internal")
                conv.closed_reason = "internal error"
                try:
                    await conv.send(conv.encode_error(INTERNAL_ERROR_MESSAGE))
                except SEND_ERRORS:
                    pass
                await ws.close(CLOSE_INTERNAL_ERROR, "internal error")
                return
