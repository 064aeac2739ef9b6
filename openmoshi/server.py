"""The real-time server: `/api/chat` speaks the official binary protocol (see `protocol`), many
conversations share one model through the `Batcher`, plus `/health`, `/metrics` and the web UI.

Per conversation, on the event loop:

    websocket ──parse──> audio: Ogg/Opus ──OpusDecoder──> PCM frames ──> Batcher inbox (bounded)
                         control restart: reset the slot; ping: ping back; bad input: error reply
    Batcher (worker thread) ──on_frame──> outbox (bounded, oldest dropped) ──sender task──>
        PCM ──OpusEncoder──> audio message, text piece ──> text message

A conversation that is refused (bad token, server full, shutting down, bad query parameters) gets an
error message (kind 5), then a clean websocket close. Bad messages get an error message and the
conversation goes on; after `max_errors` of them it is closed. A client that does not read has its
oldest output dropped; one that sends nothing for `idle_timeout`, or whose sends block for
`send_timeout`, is closed. None of this touches the other conversations.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from . import protocol
from .batcher import Batcher, Slot
from .metrics import Metrics
from .opus import OpusDecoder, OpusEncoder, OpusError
from .sampling import SamplingConfig

log = logging.getLogger("openmoshi.server")

WEB_DIR = Path(__file__).resolve().parent / "web"
CLOSE_UNAUTHORIZED = 4001  # private-use websocket close code
CLOSE_BAD_REQUEST = 4000


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
    cuda_graph: bool | None = None  # the model loop as CUDA graphs: None on CUDA (see openmoshi.cuda_graph)
    cfg_coef: float = 1.0  # classifier-free guidance of a conditioned model (needs `negative`)


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


# ----------------------------------------------------------------------------- query parameters

# Official web client parameter -> SamplingConfig field.
_SAMPLING_PARAMS = {"text_temperature": ("temp_text", float), "text_topk": ("top_k_text", int),
                    "audio_temperature": ("temp", float), "audio_topk": ("top_k", int)}
# Accepted and validated, but not applied: seeds would need one random generator per slot, and
# padding/repetition penalties are not part of the released sampler (the official server ignores
# every one of these parameters too).
_NUMERIC_IGNORED = {"text_seed": int, "audio_seed": int, "pad_mult": float, "repetition_penalty": float,
                    "repetition_penalty_context": int}


def sampling_from_query(query, default: SamplingConfig) -> SamplingConfig:
    """The official client's settings as a SamplingConfig; ValueError with a readable message."""
    changes = {}
    for name, (field_name, kind) in _SAMPLING_PARAMS.items():
        raw = query.get(name, "")
        if raw == "":
            continue
        try:
            value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
        except ValueError:
            raise ValueError(f"query parameter {name}={raw!r} is not a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"query parameter {name}={raw!r} must be finite")
        changes[field_name] = value
    for name, kind in _NUMERIC_IGNORED.items():
        raw = query.get(name, "")
        if raw != "":
            try:
                float(raw)
            except ValueError:
                raise ValueError(f"query parameter {name}={raw!r} is not a number") from None
    return replace(default, **changes)  # SamplingConfig checks the ranges


def _token_from(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("worker_auth_id") or None


def _same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# ----------------------------------------------------------------------------- one conversation


class Conversation:
    """The event-loop side of one websocket conversation."""

    def __init__(self, server: "MoshiServer", ws: web.WebSocketResponse, peer: str):
        self.server, self.ws, self.peer = server, ws, peer
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
        self.slot: Slot | None = None
        self.closed_reason = "client closed"

    # Called from the worker thread.
    def on_ready(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.ready.done() or self.ready.set_result(None))

    def on_frame(self, pcm: np.ndarray, text: str | None) -> None:
        self.loop.call_soon_threadsafe(self._deliver, pcm, text)

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
        await asyncio.wait_for(self.ws.send_bytes(data), self.server.config.send_timeout)

    async def sender(self) -> None:
        try:
            while True:
                await self.out_event.wait()
                self.out_event.clear()
                while self.outbox:
                    kind, value = self.outbox.popleft()
                    if kind == "audio":
                        self.frames_out += 1
                        ogg = self.encoder.encode(value)
                        if ogg:
                            await self.send(protocol.encode_audio(ogg))
                    else:
                        await self.send(protocol.encode_text(value))
        except (asyncio.TimeoutError, ConnectionError, RuntimeError) as e:
            # A send that blocks or fails: the client is gone or stuck. Closing ends the receiver.
            self.closed_reason = f"send failed: {type(e).__name__}"
            await self.ws.close(code=WSCloseCode.GOING_AWAY)

    async def error(self, message: str, kind: str) -> None:
        """Reports a bad message to the client; closes after too many."""
        self.errors += 1
        self.server.metrics.inc("openmoshi_errors_total", kind=kind)
        event("bad_message", logging.WARNING, peer=self.peer, kind=kind, message=message)
        try:
            await self.send(protocol.encode_error(message))
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        if self.errors >= self.server.config.max_errors:
            self.closed_reason = "too many bad messages"
            await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many bad messages")

    async def handle(self, data: bytes) -> None:
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
        self.batcher = Batcher(lm, mimi, tokenizer, config.max_sessions, sampling, self.metrics, condition,
                               config.cuda_graph, config.cfg_coef, negative)
        self.conversations: set[Conversation] = set()
        self.draining = False

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.handle_chat)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        static = self.config.static_dir
        index = None if static is None else Path(static) / "index.html"

        async def root(_):
            if index is not None and index.is_file():
                return web.FileResponse(index)
            return web.Response(text="openmoshi server: websocket at /api/chat\n")

        app.router.add_get("/", root)
        if index is not None and Path(static).is_dir():
            app.router.add_static("/", path=str(static), name="static")
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app) -> None:
        self.batcher.start()
        await asyncio.to_thread(self.batcher.ready.wait)  # on CUDA, graph captures: seconds before listening
        event("server_started", max_sessions=self.config.max_sessions)

    async def _on_shutdown(self, app) -> None:
        """Stops taking conversations, lets the open ones end for `shutdown_grace`, closes the rest."""
        self.draining = True
        event("draining", active=len(self.conversations))
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.conversations and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for conv in list(self.conversations):
            conv.closed_reason = "server shutdown"
            try:
                await conv.send(protocol.encode_error("the server is shutting down"))
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
            await conv.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def _on_cleanup(self, app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)
        event("server_stopped")

    async def handle_health(self, request: web.Request) -> web.Response:
        status = "crashed" if self.batcher.crashed else "draining" if self.draining else "ok"
        body = {"status": status, "active": self.batcher.active, "max_sessions": self.config.max_sessions}
        return web.json_response(body, status=200 if status == "ok" else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _refuse(self, ws: web.WebSocketResponse, message: str, code: int, reason: str, peer: str) -> web.WebSocketResponse:
        self.metrics.inc("openmoshi_rejected_total", reason=reason)
        event("refused", logging.WARNING, peer=peer, reason=reason)
        try:
            await asyncio.wait_for(ws.send_bytes(protocol.encode_error(message)), self.config.send_timeout)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        await ws.close(code=code, message=reason.encode())
        return ws

    async def handle_chat(self, request: web.Request) -> web.WebSocketResponse:
        peer = request.remote or "?"
        # Messages a little over the protocol limit still reach `parse` (and get an error reply);
        # far larger ones are refused by aiohttp itself with close code 1009.
        ws = web.WebSocketResponse(heartbeat=self.config.heartbeat, max_msg_size=4 * protocol.MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        token = self.config.auth_token
        if token is not None and not _same_token(_token_from(request), token):
            return await self._refuse(ws, "unauthorized: missing or wrong token", CLOSE_UNAUTHORIZED, "auth", peer)
        if self.draining:
            return await self._refuse(ws, "the server is shutting down", WSCloseCode.GOING_AWAY, "draining", peer)
        try:
            sampling = sampling_from_query(request.query, self.sampling)
        except ValueError as e:
            return await self._refuse(ws, f"bad request: {e}", CLOSE_BAD_REQUEST, "bad_query", peer)
        conv = Conversation(self, ws, peer)
        conv.slot = self.batcher.open(sampling, conv.on_ready, conv.on_frame)
        if conv.slot is None:
            return await self._refuse(ws, f"the server is busy: all {self.config.max_sessions} conversations "
                                      "are taken, try again later", WSCloseCode.TRY_AGAIN_LATER, "busy", peer)
        self.conversations.add(conv)
        self.metrics.inc("openmoshi_conversations_total")
        started = time.monotonic()
        sender = None
        try:
            await asyncio.wait_for(conv.ready, self.config.ready_timeout)
            event("conversation_start", peer=peer, slot=conv.slot.index, sampling=sampling.__dict__)
            await conv.send(protocol.encode_handshake())
            sender = asyncio.create_task(conv.sender())
            await self._receive(conv)
        except asyncio.TimeoutError:
            conv.closed_reason = "timeout"
        except (ConnectionError, RuntimeError) as e:  # the client vanished while we were sending
            conv.closed_reason = f"connection lost: {type(e).__name__}"
        finally:
            self.batcher.close(conv.slot)
            self.conversations.discard(conv)
            if sender is not None:
                sender.cancel()
            if not ws.closed:
                await ws.close()
            event("conversation_end", peer=peer, slot=conv.slot.index, reason=conv.closed_reason,
                  seconds=round(time.monotonic() - started, 2), frames_in=conv.slot.frames_in,
                  frames_out=conv.frames_out, dropped=conv.dropped, errors=conv.errors)
        return ws

    async def _receive(self, conv: Conversation) -> None:
        ws = conv.ws
        while not ws.closed:
            try:
                msg = await ws.receive(timeout=self.config.idle_timeout)
            except asyncio.TimeoutError:
                conv.closed_reason = "idle timeout"
                await conv.error(f"no message for {self.config.idle_timeout:g} s: closing", "idle")
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"idle timeout")
                return
            if msg.type == WSMsgType.BINARY:
                await conv.handle(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await conv.error("text websocket frames are not part of the protocol: send binary messages", "protocol")
            elif msg.type == WSMsgType.ERROR:
                conv.closed_reason = f"websocket error: {ws.exception()}"
                return
            else:  # CLOSE, CLOSING, CLOSED
                return
