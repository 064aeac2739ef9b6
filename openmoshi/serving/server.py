"""The real-time server: many conversations share one model through one model loop; `/api/chat`
speaks the official binary protocol, `/v1/realtime` the OpenAI Realtime API, plus `/health` and
`/metrics`; with a Kyutai STT model, `/api/asr-streaming` speaks moshi-server's protocol (`asr`). This module is the server's logic, independent of any web framework (`app.py` makes it an
ASGI application, run by uvicorn for `openmoshi serve` or by Ray Serve across machines).

Serving in three parts:

    Session (`session`)           one client: its seat, outbox, timeouts, the frame assembler
      + a wire protocol           `chat.ChatProtocol` or `realtime.protocol.RealtimeProtocol`
    ModelLoop (`loop`)            the worker thread: the engine, its rows, the ticks

The server owns the seats (who is in, the waiting line) on the event loop; the model loop owns the
rows. A client that arrives while every seat is taken waits in a bounded line, first come first
served (`waiting`), told its place (when its protocol can say it) until a seat frees; then its
conversation starts with the protocol's greeting. A conversation that is refused (bad token, line
full, waited too long, shutting down, bad query parameters, a model loop that cannot serve) gets an
error message, then a clean websocket close with a code that says why.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from openmoshi.engine.engine import check_conditions, check_memory
from openmoshi.engine.speed import Speed, SpeedConfig, choose
from openmoshi.engine.threads import passing
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.lm.stt import SttTiming
from openmoshi.serving.chat import ChatProtocol
from openmoshi.serving.loop import TICK_SLACK, Ended, Frame, Join, Leave, ModelLoop, Ready, Seat
from openmoshi.serving.metrics import Metrics
from openmoshi.serving.params import sampling_from_query, seeds_from_query
from openmoshi.serving.personas import Personas
from openmoshi.serving.session import (CLOSE_BAD_REQUEST, CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR,  # noqa: F401
                                       CLOSE_NORMAL, CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER,
                                       CLOSE_UNAUTHORIZED, SEND_ERRORS, Session, SlotFailed, Socket, WireProtocol,
                                       event)
from openmoshi.serving.waiting import ADMITTED, LEFT, STOPPING, TIMED_OUT, Ticket, WaitingLine, wait_turn

log = logging.getLogger("openmoshi.serving.server")

WEB_DIR = Path(__file__).resolve().parent / "web"
# The kind of each model, as a refusal names it, and the endpoints that serve it.
ENDPOINTS = {"speech": ("speech", "/api/chat or /v1/realtime"), "stt": ("speech-to-text", "/api/asr-streaming"),
             "tts": ("text-to-speech", "/api/tts_streaming")}
SHUTDOWN_MESSAGE = "the server is shutting down: reconnect to start a new conversation"
STALL_SECONDS = 10.0  # a model loop that has not come round for this long is hung
INTERNAL_ERROR_MESSAGE = "internal error while handling your message: the conversation is closed; reconnect"


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
    cuda_graph: bool | None = None  # without a `speed`: CUDA graphs (None: on CUDA, see engine.speed)
    cfg_coef: float = 1.0  # classifier-free guidance of a conditioned model (needs `negative`)
    queue_size: int = 16  # clients waiting for a slot when all are taken; more are refused (0: no line)
    queue_timeout: float = 120.0  # seconds a client waits for a slot before it is refused
    queue_update: float = 2.0  # seconds between place-in-line messages (official client: silent 10 s = gone)
    clock: str = "realtime"  # "input": tick only on every slot's next frame, no silence inserted (tests, reproducible runs)
    voice_dir: Path | None = None  # PersonaPlex voices (`voice_prompt` query parameter, GET /api/voices)
    asr_delay_tokens: int | None = None  # STT: moshi-server's asr_delay_in_tokens (None: from stt_config)




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



# ----------------------------------------------------------------------------- auth


def _token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The client's token: `Authorization: Bearer`, or `?worker_auth_id=` (the official client), or
    moshi-server's `kyutai-api-key` header or `?auth_id=`."""
    header = headers.get("authorization", "") or headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    key = headers.get("kyutai-api-key") or headers.get("Kyutai-Api-Key")
    return key or query.get("worker_auth_id") or query.get("auth_id") or None


def _same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))




class Seats:
    """The conversations' seats, on the event loop: at most `n` taken at once."""

    def __init__(self, n: int, input_clock: bool):
        self.free, self.input_clock = list(range(n)), input_clock
        self.taken: dict[Seat, Session] = {}

    def __len__(self) -> int:
        return len(self.taken)

    def open(self, session: Session) -> Seat | None:
        if not self.free:
            return None
        seat = Seat(self.free.pop(0), self.input_clock)
        self.taken[seat] = session
        return seat

    def close(self, seat: Seat) -> None:
        if self.taken.pop(seat, None) is not None:
            self.free.append(seat.id)
            self.free.sort()


class MoshiServer:
    def __init__(self, lm, mimi, tokenizer, config: ServerConfig = ServerConfig(),
                 sampling: SamplingConfig = SamplingConfig(), condition: dict | None = None,
                 negative: dict | None = None, speed: Speed | None = None, stt: SttTiming | None = None,
                 tts=None):
        """`speed`: the paths `engine.speed.prepare` applied to the models; None: none applied,
        CUDA graphs as `config.cuda_graph` says. `stt`: the model is Kyutai STT (dep_q = 0) with
        this timing: the server speaks `/api/asr-streaming` (`asr.AsrProtocol`) on the stream clock.
        `tts` (`serving.tts.TTSHost`): the model is Kyutai TTS, served at `/api/tts_streaming` by a
        `tts_loop.TTSLoop`."""
        from openmoshi.engine.engine import Engine

        if tts is None:
            check_conditions(lm, mimi, condition, negative, config.cfg_coef)
            check_memory(lm, config.max_sessions, config.cfg_coef)
        self.config, self.sampling, self.tokenizer = config, sampling, tokenizer
        self.takes_personas = bool(lm.cfg.depformer_user_slots)
        if stt is not None and lm.cfg.dep_q:
            raise ValueError("an STT server needs a model without a depth transformer (dep_q = 0)")
        self.stt, self.tts = stt, tts
        self.model_kind = "stt" if stt is not None else "tts" if tts is not None else "speech"
        self.text_ids = (lm.cfg.existing_text_padding_id, lm.cfg.existing_text_end_padding_id)
        self.lm_cfg = lm.cfg  # the text vocabulary injected speech is laid out in (`lm.inject`)
        clock = "stream" if stt is not None else config.clock
        self.metrics = Metrics()
        self.metrics.max_sessions = config.max_sessions
        for direction in ("in", "out"):
            self.metrics.inc("openmoshi_frames_dropped_total", 0, direction=direction)
        self.metrics.inc("openmoshi_errors_total", 0, kind="protocol")
        self.metrics.inc("openmoshi_queue_timeouts_total", 0)
        device = next(lm.parameters()).device
        speed = speed or choose(device, SpeedConfig(cuda_graphs=config.cuda_graph, self_check=False))
        topk = dict(max_k=max(sampling.top_k, 250), max_k_text=max(sampling.top_k_text, 25))  # room for the UI's

        if tts is not None:
            from openmoshi.serving.tts_loop import TTSEngine, TTSLoop

            clock = "stream"

        def make_engine():  # in the worker thread, at each (re)start
            if tts is not None:
                return TTSEngine(lm, mimi, tts.model.spec, tts.settings, config.max_sessions, tts.cross_len,
                                 tts.max_prefix)
            return Engine(lm, mimi, config.max_sessions, speed, sampling, condition, negative, config.cfg_coef,
                          **topk)

        if tts is not None:
            self.loop = TTSLoop(make_engine, config.max_sessions, self._from_loop, tokenizer, lm.cfg, self.metrics)
        else:
            self.loop = ModelLoop(make_engine, config.max_sessions, self._from_loop, tokenizer, lm.cfg, self.metrics,
                                  clock)
        self.personas = Personas(lm, mimi, tokenizer, config.voice_dir)
        self.seats = Seats(config.max_sessions, clock != "realtime")  # these clocks drop no input
        self.sessions: set[Session] = set()
        self.line = WaitingLine(config.queue_size, self.metrics.set_waiting)
        self.draining = False
        self._event_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_model(cls, model, speed: Speed, config: ServerConfig = ServerConfig()) -> "MoshiServer":
        """The server of a loaded model (`engine.startup.start`): the condition its type takes, the
        sampling of its checkpoint's `lm_gen_config` (the official defaults otherwise)."""
        from openmoshi.engine.engine import conditions

        condition, negative = conditions(model.lm, model.config.model_type, config.cfg_coef)
        sampling = SamplingConfig.from_gen_config(model.config.lm_gen_config)
        stt = None
        if model.config.model_type == "stt":  # greedy, as moshi-server unless its config sets a temperature
            stt, sampling = SttTiming.of(model.config, config.asr_delay_tokens), SamplingConfig.greedy()
        return cls(model.lm, model.mimi, model.tokenizer, config, sampling, condition, negative, speed, stt)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Starts the model loop (on CUDA: captures its graphs, seconds) before any conversation."""
        self._event_loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()  # set when the model loop is given up: the process should exit

        def gave_up() -> None:  # worker thread: the model loop died too often
            self._hop(self.failed.set)

        self.loop.on_fatal = gave_up
        self.loop.start()
        await asyncio.to_thread(self.loop.ready.wait)
        event("server_started", max_sessions=self.config.max_sessions)

    def _hop(self, fn, *args) -> None:
        """Runs fn on the event loop, from the worker thread; nothing once the event loop is closed."""
        try:
            self._event_loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def _from_loop(self, events: list) -> None:
        self._hop(self._dispatch, events)

    def _dispatch(self, events: list) -> None:
        """A tick's events, on the event loop, to the sessions still holding their seats."""
        for e in events:
            session = self.seats.taken.get(e.seat)
            if session is None:
                continue  # it left meanwhile
            if isinstance(e, Frame):
                session.on_frame(e.pcm, e.text, e.token, e.prs, e.inject)
            elif isinstance(e, Ready):
                session.on_ready()
            elif isinstance(e, Ended):
                session.on_ended(e.message)
            else:  # a model's own events (TTS words, a stream's end)
                session.protocol.event(e)

    async def drain(self) -> None:
        """Stops taking conversations, lets the open ones end for `shutdown_grace`, closes the rest."""
        self.draining = True
        event("draining", active=len(self.sessions), waiting=len(self.line))
        self.line.wake_all()  # waiters see `draining` and are told to go
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for session in list(self.sessions):
            session.closed_reason = "server shutdown"
            try:
                await session.send(session.protocol.refusal(SHUTDOWN_MESSAGE))
            except SEND_ERRORS:
                pass
            await session.ws.close(CLOSE_GOING_AWAY, "server shutdown")

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)
        event("server_stopped")

    # ------------------------------------------------------------------ seats

    @property
    def active(self) -> int:
        return len(self.seats)

    def _open(self, session: Session, join: Join) -> Seat | None:
        """A seat for the session (None when all are taken); the model loop starts its conversation."""
        seat = self.seats.open(session)
        if seat is None:
            return None
        session.seat, session.join = seat, replace(join, seat=seat)
        self.metrics.set_active(len(self.seats))
        self.loop.submit(session.join)
        return seat

    def _close(self, session: Session) -> None:
        """The session's seat frees: the model loop drops its row, the first waiter takes the seat."""
        if session.seat is None or session.seat not in self.seats.taken:
            return
        self.loop.submit(Leave(session.seat))
        self.seats.close(session.seat)
        self.metrics.set_active(len(self.seats))
        if not self.draining:
            self.line.admit()

    # ------------------------------------------------------------------ routes

    def problem(self) -> str | None:
        """Why this server cannot serve (its model loop crashed or hangs), None when it can."""
        if self.loop.crashed:
            return "the model loop crashed"
        if self.loop.stalled(STALL_SECONDS):
            return f"the model loop has not moved for {STALL_SECONDS:g} s"
        return None

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of /health: 200 while conversations can start, 503 otherwise."""
        problem = self.problem()
        status = ("crashed" if self.loop.crashed else "stalled") if problem else "draining" if self.draining else "ok"
        lp = self.loop
        body = {"status": status, "active": self.active, "max_sessions": self.config.max_sessions,
                "waiting": len(self.line), "queue_size": self.config.queue_size,
                "model_loop": {"restarts": lp.restarts, "failed_ticks": lp.tick_errors,
                               "failed_commands": lp.command_errors, "last_error": lp.last_error,
                               **({"problem": problem} if problem else {})}}
        return (200 if status == "ok" else 503), body

    async def _refuse(self, ws: Socket, message: str, code: int, reason: str, peer: str, protocol) -> None:
        self.metrics.inc("openmoshi_rejected_total", reason=reason)
        event("refused", logging.WARNING, peer=peer, reason=reason)
        try:
            await asyncio.wait_for(ws.send(protocol.refusal(message)), self.config.send_timeout)
        except SEND_ERRORS:
            pass
        await ws.close(code, reason)

    async def chat(self, ws: Socket, query: Mapping[str, str], headers: Mapping[str, str], peer: str,
                   protocol: WireProtocol | None = None) -> None:
        """One client, its websocket accepted, from the first message to the close; `protocol`:
        a new instance of its wire protocol (default the official one of /api/chat)."""
        protocol = protocol or ChatProtocol()
        kind = getattr(protocol, "model_kind", "speech")
        if kind != self.model_kind:
            what, wanted = ENDPOINTS[self.model_kind]
            return await self._refuse(ws, f"this server runs a {what} model: connect to {wanted}", CLOSE_BAD_REQUEST,
                                      "wrong_endpoint", peer, protocol)
        token = self.config.auth_token
        if token is not None and not _same_token(_token_from(headers, query), token):
            return await self._refuse(ws, "unauthorized: missing or wrong token", CLOSE_UNAUTHORIZED, "auth", peer,
                                      protocol)
        if self.draining:
            return await self._refuse(ws, "the server is shutting down", CLOSE_GOING_AWAY, "draining", peer, protocol)
        try:
            prompt = None
            if self.tts is not None:  # its voice may be loaded (and encoded), off the event loop
                join = await asyncio.to_thread(passing, protocol.join)
                sampling = join.sampling
            else:
                # STT decodes as the server's model says (greedy), like moshi-server: no client setting
                sampling = self.sampling if self.stt is not None else sampling_from_query(query, self.sampling)
                seeds = seeds_from_query(query)
                prompt, persona = await self.personas.prompt(query)
                join = Join(None, sampling, seeds, prompt, persona)
        except ValueError as e:
            return await self._refuse(ws, f"bad request: {e}", CLOSE_BAD_REQUEST, "bad_query", peer, protocol)
        except Exception:  # a bug: its traceback in the log, a short error to this client only
            log.exception("conversation_error", extra={"fields": {"peer": peer}})
            return await self._refuse(ws, INTERNAL_ERROR_MESSAGE, CLOSE_INTERNAL_ERROR, "internal", peer, protocol)
        problem = self.problem()
        if problem is not None:
            return await self._refuse(ws, f"the server cannot serve right now ({problem}): try again later",
                                      CLOSE_TRY_AGAIN_LATER, "unavailable", peer, protocol)
        session = Session(self, ws, peer, protocol, query)
        seat = None if len(self.line) else self._open(session, join)  # nobody overtakes those who wait
        if seat is None:
            ticket = self.line.join(lambda: self._open(session, join))
            if ticket is None:
                full = f" and the waiting line is full ({len(self.line)})" if self.config.queue_size else ""
                return await self._refuse(ws, f"the server is busy: all {self.config.max_sessions} conversations "
                                          f"are taken{full}, try again later", CLOSE_TRY_AGAIN_LATER, "busy", peer,
                                          protocol)
            if await self._wait_in_line(session, ticket) is None:
                return
        self.sessions.add(session)
        self.metrics.inc("openmoshi_conversations_total")
        started = time.monotonic()
        sender = filler = None
        try:
            if prompt is None:
                await asyncio.wait_for(session.ready, self.config.ready_timeout)
            else:
                await self._run_prompt(session, prompt)
            event("conversation_start", peer=peer, slot=session.seat.id, waited=round(session.waited, 2),
                  sampling=getattr(sampling, "__dict__", None))
            greeting = protocol.greeting()
            if greeting is not None:
                await session.send(greeting)
            if hasattr(protocol, "started_stream"):
                protocol.started_stream()
            sender = asyncio.create_task(session.sender())
            if getattr(protocol, "fills_silence", False):
                filler = asyncio.create_task(session.fill_silence())
            await self._receive(session)
        except asyncio.TimeoutError:
            session.closed_reason = "timeout"
        except ConnectionError as e:  # the client vanished while we were sending
            session.closed_reason = f"connection lost: {type(e).__name__}"
        except SlotFailed as e:  # the model loop could not start it
            await session.close_with_error(str(e))
        finally:
            self._close(session)
            self.sessions.discard(session)
            if hasattr(protocol, "session_ended"):  # a protocol with streams of its own (Realtime transcription)
                protocol.session_ended()
            for task in (sender, filler):
                if task is not None:
                    task.cancel()
            await ws.close()
            event("conversation_end", peer=peer, slot=session.seat.id, reason=session.closed_reason,
                  seconds=round(time.monotonic() - started, 2), frames_in=session.seat.frames_in,
                  frames_out=session.frames_out, dropped=session.dropped, errors=session.errors)

    async def _run_prompt(self, session: Session, prompt) -> None:
        """Waits for the seat's persona prompt phase (at worst one frame per 80 ms tick), answering
        the client's pings meanwhile (the official client gives up after 10 s of silence)."""
        listener = asyncio.create_task(self._listen_while_waiting(session))
        try:
            done, _ = await asyncio.wait({session.ready, listener}, timeout=self.config.ready_timeout
                                         + prompt.frames * TICK_SLACK, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            await asyncio.wait({listener})  # its ws.receive() must end before the conversation's
        if session.ready not in done:
            if listener in done:
                raise ConnectionError("the client left during its persona prompt")
            raise asyncio.TimeoutError
        session.ready.result()  # SlotFailed when the model loop ended it

    async def _wait_in_line(self, session: Session, ticket: Ticket) -> Seat | None:
        """Waits for the client's turn, telling it its place; returns its seat. Returns None when it
        left, waited `queue_timeout` or the server is shutting down: the client has then been told
        and closed. A seat given to a client that left at that moment is closed again."""
        cfg, ws = self.config, session.ws
        started = time.monotonic()
        event("queued", peer=session.peer, position=self.line.position(ticket), waiting=len(self.line))
        self.line.admit()  # a seat may have freed just before this client joined
        listener = asyncio.create_task(self._listen_while_waiting(session))

        async def tell(position: int, length: int) -> None:
            message = session.protocol.place_in_line(position, length)
            if message is not None:
                await session.send(message)

        outcome = LEFT
        try:
            outcome = await wait_turn(self.line, ticket, tell, listener, cfg.queue_timeout, cfg.queue_update,
                                      lambda: self.draining)
        finally:
            if ticket.slot is not None and outcome != ADMITTED:
                self._close(session)
            listener.cancel()
            await asyncio.wait({listener})  # its ws.receive() must end before the conversation's
        session.waited = time.monotonic() - started
        if outcome == ADMITTED:
            return ticket.slot
        if outcome == TIMED_OUT:
            self.metrics.inc("openmoshi_queue_timeouts_total")
            await self._refuse(ws, f"no conversation slot freed up within {cfg.queue_timeout:g} s: the server "
                               "is busy, try again later", CLOSE_TRY_AGAIN_LATER, "queue_timeout", session.peer,
                               session.protocol)
        elif outcome == STOPPING:
            await self._refuse(ws, "the server is shutting down", CLOSE_GOING_AWAY, "draining", session.peer,
                               session.protocol)
        else:
            event("queue_left", peer=session.peer, seconds=round(session.waited, 2))
            await ws.close()
        return None

    async def _listen_while_waiting(self, session: Session) -> None:
        """Reads a waiting client until it leaves (its protocol's `while_waiting` sees each message)."""
        while True:
            data = await session.ws.receive()
            if data is None:
                return  # closed
            try:
                await session.protocol.while_waiting(data)
            except SEND_ERRORS:
                return  # cannot send: gone

    async def _receive(self, session: Session) -> None:
        ws = session.ws
        while not ws.closed:
            try:
                data = await asyncio.wait_for(ws.receive(), self.config.idle_timeout)
            except asyncio.TimeoutError:
                if getattr(session.protocol, "waits_for_model", lambda: False)():
                    continue  # the client waits for the model's output (TTS after Eos): not idle
                session.closed_reason = "idle timeout"
                await session.error(f"no message for {self.config.idle_timeout:g} s: closing", "idle")
                await ws.close(CLOSE_GOING_AWAY, "idle timeout")
                return
            if data is None:
                return  # the client closed (or the connection broke)
            try:
                await session.protocol.handle(data)
            except SEND_ERRORS:
                raise
            except Exception:  # a bug: its traceback in the log, a short error to this client only
                log.exception("conversation_error", extra={"fields": {"peer": session.peer}})
                self.metrics.inc("openmoshi_errors_total", kind="internal")
                session.closed_reason = "internal error"
                try:
                    await session.send(session.protocol.refusal(INTERNAL_ERROR_MESSAGE))
                except SEND_ERRORS:
                    pass
                await ws.close(CLOSE_INTERNAL_ERROR, "internal error")
                return
