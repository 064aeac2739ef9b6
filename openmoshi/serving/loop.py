"""The server's model loop: one worker thread owns the engine and its rows, and ticks once per frame.

    loop = ModelLoop(make_engine, batch, sink, tokenizer)     # sink(events): once per tick, worker thread
    seat = Seat(0)                                            # the event loop's handle of a conversation
    loop.submit(Join(seat, sampling, seeds))                  # commands: immutable payloads, applied in order
    loop.push(seat, frames)                                   # PCM frames [k, 1920] into the seat's inbox
    loop.submit(Leave(seat))

Two sides and what each owns. The event loop owns the seats (who is in the conversation, the
waiting line, the count of active conversations); the worker owns the rows: which seat is in which
row of the engine's states. A command names a seat, never a row, and the worker alone maps one to
the other, so nothing is rewritten under the other side's feet.

    inbox[seat] (PCM frames) ──> TickInput: pcm [n, 1, F], active [n], first [n], position
        ──tick (engine: Mimi encode, LM step, Mimi decode over rows [0, n))──> TickOutput:
        text [n], valid [n], pcm [n, F]  ──> events: Frame(seat, pcm, text) for valid rows ──> sink
    (a tick covers rows [start, start + n): all occupied ones, or a phase group's)

Rows: a joining conversation takes the lowest free row; when one leaves a hole below busy rows, the
highest row's conversation moves into it between ticks (`Engine.move`), so the occupied rows stay
[0, k) and a tick runs on the smallest bucket n >= k. What a conversation hears depends on its input
and seeds only, never on its row or its neighbours.

Frame policy, per row, as the official server: every input frame is encoded and given to one LM
step; the first step only reads initial tokens, and right after the first frame the row's Mimi
encoder state is reset so the next frame starts with fresh left padding; each step's output is
decoded and sent at once. The realtime clock ticks phase groups (`serving.phases`): the rows whose
frames are in, as soon as they are in, while the model has room for separate ticks, and one batch
of every row when it has not; a tick of rows [a, b) runs on the states' span of those rows
(`Engine.bucket(n, start)`), or on a bucket from row 0 when the rows it adds are free. No silence is
ever made up for a late client: its row waits for its frame, so a conversation's output is a function
of its own input and seeds. A machine that cannot keep up says so once (`_check_pace`) and drops the
oldest input beyond INBOX_FRAMES, so latency stays bounded. The input clock (`clock="input"`, for
tests and reproducible runs) ticks only when every row has its next frame, in one batch, and never
drops input. The stream clock (`clock="stream"`, speech to text: moshi-server's batched ASR) never
waits for anyone: a tick of every occupied row happens as soon as any row has a frame, and a row
without one sits that tick out, its states untouched (`TickInput.hold`: Mimi's encoder and the LM
step it as inactive); input that comes faster than the steps waits in the inbox, never dropped; a
row's first frame is read twice (see `lm.stt`). `recorder(seat, pcm_in, text, audio, valid)`, when
set, sees every row's tick.

Injected speech (issue 22): `Inject(seat, tokens, tag)` queues text tokens on the seat's row (the
worker's `_Row.injected`); each tick that steps the row, once past its prompt, forces the next one on
its text stream (`TickInput.inject`: column 0 of the step's `forced`, its audio still sampled), and
the frame that comes out of that step (max_delay ticks later) carries the tag (`Frame.inject`).
`CancelInject` drops the queued ones. The row keeps hearing its input all the while.

Failures (issue 23): a command that raises ends that conversation only, a tick that raises ends the
conversations of that tick (their rows reset), and the loop goes on. A loop that dies is restarted
with a fresh engine (the conversations it held are ended); after MAX_RESTARTS deaths within
RESTART_WINDOW seconds it is given up (`crashed`), and `on_fatal` tells the server.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID
from openmoshi.lm.persona import Prompt, PromptCursor
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.serving.metrics import Metrics
from openmoshi.serving.phases import FRAME_S, Costs, plan
from openmoshi.serving.prompts import PromptRunner

log = logging.getLogger("openmoshi.serving.server")

FRAME_SIZE = 1920  # samples of an 80 ms frame at 24 kHz
TICK_SLACK = 0.1  # latest tick: 80 ms plus 20 ms of grace for a client's network jitter
INBOX_FRAMES = 6  # input frames kept per seat (480 ms of network jitter); the oldest are dropped beyond
BEHIND_FRAMES = 3  # a backlog this long says the machine cannot keep real time (`_check_pace`)
WAIT = object()  # `_plan`: nothing to tick yet
HIDDEN_TEXT_IDS = (TEXT_END_PADDING_ID, TEXT_PADDING_ID)  # never shown to users
CLOCKS = ("realtime", "input", "stream")
MAX_RESTARTS, RESTART_WINDOW = 3, 60.0  # a model loop that dies more often than this is given up
STEP_FAILED_MESSAGE = ("internal error: the model failed on this frame and the conversation was ended (the "
                       "server goes on); reconnect to start a new conversation")
COMMAND_FAILED_MESSAGE = ("internal error: the model could not apply this conversation's settings, so it was "
                          "ended (the server goes on); reconnect to start a new conversation")
LOOP_CRASHED_MESSAGE = ("internal error: the model loop failed and is restarting; this conversation was "
                        "ended: reconnect to start a new one")


class Seat:
    """A conversation's place, as both sides see it: the event loop makes it and pushes frames into
    its inbox; the worker reads them."""

    def __init__(self, id: int, input_clock: bool = False):
        self.id = id
        # (arrival time, PCM frame [F]); the input clock drops nothing
        self.inbox: deque = deque() if input_clock else deque(maxlen=INBOX_FRAMES)
        self.frames_in = 0
        self.last_arrival: float | None = None  # time.monotonic() of its latest frame

    def __repr__(self) -> str:
        return f"Seat({self.id})"


# ----------------------------------------------------------------------------- commands and events


@dataclass(frozen=True)
class Join:
    """A conversation starts (or restarts) in `seat`: its row is reset, then its prompt runs."""

    seat: Seat
    sampling: SamplingConfig
    seeds: tuple[int, int] | None = None  # text and audio seeds; None: random at each (re)start
    prompt: Prompt | None = None  # a persona's prompt phase, run before Ready
    persona: tuple | None = None  # its key in the persona cache


@dataclass(frozen=True)
class Leave:
    seat: Seat


@dataclass(frozen=True)
class Configure:
    """New sampling settings from the seat's next frame on; its state stays."""

    seat: Seat
    sampling: SamplingConfig


@dataclass(frozen=True)
class Inject:
    """Text for the seat's model to say (issue 22): `tokens` (`lm.inject.inject_tokens`) are forced
    on its text stream, one a tick, after any injection still queued; `tag` names this injection
    in the frames that carry its tokens (`Frame.inject`). A row in its prompt phase starts them
    once its prompt is over."""

    seat: Seat
    tokens: tuple[int, ...]
    tag: int = 0


@dataclass(frozen=True)
class CancelInject:
    """Drops the seat's queued injected tokens of `tag` (None: of every injection); the model's own
    sampling resumes at its next tick."""

    seat: Seat
    tag: int | None = None


@dataclass(frozen=True)
class Ready:
    seat: Seat


@dataclass(frozen=True)
class Frame:
    seat: Seat
    pcm: np.ndarray  # [F] float32, the seat's own copy
    text: str | None  # the frame's text piece (None: padding)
    token: int = -1  # its text token id
    prs: tuple[float, ...] | None = None  # the step's extra heads' P(class 0) (Kyutai STT's pause heads)
    inject: int | None = None  # the tag of the injection whose token is this frame's text (None: sampled)


@dataclass(frozen=True)
class Ended:
    """The loop ended this conversation (a failure); `message` is for its client."""

    seat: Seat
    message: str


@dataclass(eq=False)
class _Row:
    """A row's conversation, as the worker keeps it."""

    seat: Seat
    join: Join
    steps: int = 0
    cursor: PromptCursor | None = None  # while its prompt runs
    injected: deque = field(default_factory=deque)  # (token, tag) to force on its text stream, one a tick
    tags: deque = field(default_factory=deque)  # the injection tag of its last max_delay + 1 steps (None: sampled)


# ----------------------------------------------------------------------------- one tick


@dataclass(frozen=True)
class TickInput:
    """What the engine computes for rows [start, start + n)."""

    pcm: np.ndarray  # [n, 1, F] float32, zeros where a row has no frame
    active: np.ndarray  # [n] bool: rows taking part in this tick
    first: np.ndarray  # [n] bool: the row's first frame (its encoder restarts after it)
    position: int  # the furthest row's steps since its reset: bounds the attention window
    listen: bool = True  # False when every row is in its prompt: no Mimi this tick
    prompts: dict[int, PromptCursor] = field(default_factory=dict)  # rows in their prompt phase (0: `start`)
    start: int = 0  # the first row: a phase group's span of rows, or 0 for a bucket
    hold: np.ndarray | None = None  # [n] bool: occupied rows without a frame this tick (stream clock)
    inject: dict[int, int] = field(default_factory=dict)  # row (0: `start`) -> its injected text token this tick


@dataclass(frozen=True)
class TickOutput:
    text: list[int]  # [n] text token of each row's output frame
    valid: list[bool]  # [n] whether the row produced a complete frame
    audio: np.ndarray | None  # [n, Q] the frame's audio codes (for a recorder), None when not asked
    pcm: np.ndarray | None  # [n, F] decoded audio, None when nothing was decoded
    prs: np.ndarray | None = None  # [n, H] each extra head's P(class 0) at this step; None without heads


def tick(engine, inp: TickInput, runner: PromptRunner, codes_out: bool = False) -> TickOutput:
    """One frame of rows [start, start + n) through the engine: encode, LM step, decode; outputs on
    the host."""
    n, a, device = inp.pcm.shape[0], inp.start, engine.device
    span = engine.bucket(n, a)
    if inp.listen:
        hold = None if inp.hold is None or not inp.hold.any() else torch.from_numpy(inp.hold)
        codes = engine.encode(torch.from_numpy(inp.pcm), a, hold)  # [n, K, 1]
        if inp.first.any():  # the first frame is in the model's past: restart those encoders afresh
            span.enc.reset(torch.from_numpy(inp.first).to(device))
    else:
        codes = torch.zeros(n, engine.mimi.num_codebooks, 1, dtype=torch.long, device=device)
    user, forcing = codes[:, :, 0], {}
    if inp.prompts:  # those rows' frames are forced, their user side the prompt's
        user, forcing["forced"], forcing["embeddings"] = runner.inputs(engine, inp.prompts, user)
    if inp.inject:  # injected speech: those rows' text token is forced, their audio sampled
        forced = forcing.get("forced")
        if forced is None:
            forced = torch.full((n, 1 + runner.cfg.gen_q), G.NOT_FORCED, dtype=torch.long)
        forced = forced.clone()
        for k, token in inp.inject.items():
            forced[k, 0] = token
        forcing["forced"] = forced.to(device)
    out = engine.step(user, torch.from_numpy(inp.active).to(device), position=inp.position, start=a, **forcing)
    if not inp.listen:
        return TickOutput([0] * n, [False] * n, None, None)
    valid = out.valid
    pcm = None
    if engine.dec is not None:
        audio = torch.where(valid[:, None], out.audio, torch.zeros_like(out.audio))  # [n, Q]
        pcm = engine.decode(audio[:, :, None], a)[:, 0]  # [n, F]
        span.dec.reset(~valid)  # rows without a complete frame decoded placeholders: start afresh
        pcm = pcm.to("cpu", torch.float32, copy=True).numpy()  # a copy: graph outputs are reused
    prs = None if out.prs is None else out.prs[:, :, 0].float().cpu().numpy()
    return TickOutput(out.text.cpu().tolist(), valid.cpu().tolist(),
                      out.audio.cpu().numpy() if codes_out else None, pcm, prs)


# ----------------------------------------------------------------------------- the loop


class ModelLoop:
    """The worker thread: commands, the clock, ticks, failures (see the module doc)."""

    def __init__(self, make_engine: Callable[[], Any], batch: int, sink: Callable[[list], None], tokenizer: Any,
                 cfg, metrics: Metrics | None = None, clock: str = "realtime"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.make_engine, self.batch, self.sink, self.tokenizer = make_engine, batch, sink, tokenizer
        self.clock, self.metrics = clock, metrics or Metrics()
        self.recorder: Callable[[Seat, np.ndarray, int, np.ndarray, bool], None] | None = None
        self.on_fatal: Callable[[], None] | None = None  # called from the worker when it gives up (`crashed`)
        self.prompts = PromptRunner(cfg)
        self.engine = None
        self.rows: list[_Row | None] = [None] * batch  # worker's
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the worker has its engine (and graphs), or crashed
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, str] = {}
        self._events: list = []
        self.costs = Costs()  # measured tick durations, for the phase groups (worker's)

    crashed = False  # the loop died for good (see _run): the server cannot serve
    restarts = 0  # times the loop was restarted after dying
    tick_errors = 0  # ticks that raised (their conversations were ended, the loop went on)
    command_errors = 0  # joins or setting changes that raised (that conversation was ended)
    last_error: str | None = None
    heartbeat = 0.0  # time.monotonic() of the worker's last pass round its loop (a stall check reads it)
    behind = False  # conversations' input is piling up: the machine cannot keep real time (`_check_pace`)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="openmoshi-model-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, command: Join | Leave | Configure | Inject | CancelInject) -> None:
        self._commands.put(command)
        self._wake.set()

    def push(self, seat: Seat, frames: np.ndarray) -> int:
        """Queues PCM frames [k, F] of a seat; returns how many old frames were dropped for room."""
        dropped, now = 0, time.monotonic()
        for frame in frames:
            if seat.inbox.maxlen is not None and len(seat.inbox) == seat.inbox.maxlen:
                dropped += 1
            seat.inbox.append((now, frame))
            seat.last_arrival = now
            seat.frames_in += 1
        if dropped:
            self.metrics.inc("openmoshi_frames_dropped_total", dropped, direction="in")
        self._wake.set()
        return dropped

    def stalled(self, after: float) -> bool:
        """Whether the worker has not come round its loop for `after` seconds (a hung step)."""
        return self._thread is not None and self.ready.is_set() and time.monotonic() - self.heartbeat > after

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:
        deaths: deque = deque(maxlen=MAX_RESTARTS + 1)
        while not self._stop.is_set():
            try:
                with torch.no_grad():
                    self._loop()
                return
            except Exception as e:
                log.exception("model_loop_crashed")
                self.metrics.inc("openmoshi_errors_total", kind="model_loop")
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                self._end([r for r in self.rows if r is not None], LOOP_CRASHED_MESSAGE, reset=False)
                self._flush()
                deaths.append(time.monotonic())
                if len(deaths) > MAX_RESTARTS and deaths[-1] - deaths[0] < RESTART_WINDOW:
                    log.error("model_loop_failed", extra={"fields": {
                        "deaths": len(deaths), "seconds": round(deaths[-1] - deaths[0], 1), "error": self.last_error,
                        "action": "given up: the server cannot serve"}})
                    self.crashed = True
                    self.ready.set()
                    if self.on_fatal is not None:
                        self.on_fatal()
                    return
                self.restarts += 1
                log.warning("model_loop_restarting", extra={"fields": {"restarts": self.restarts,
                                                                        "error": self.last_error}})
            finally:
                self.ready.set()

    def _loop(self) -> None:
        self.rows = [None] * self.batch  # after a restart, the conversations held were ended
        self.engine = None  # a restart frees the old states first
        self.prompts.cache.clear()
        self.engine = self.make_engine()
        self.engine.capture()
        self.ready.set()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._apply_commands()
            self._flush()
            if all(r is None for r in self.rows):
                self._sleep(0.1)
                continue
            spans = self._plan()
            if spans is WAIT:
                continue  # it waited for a frame, a command or its time: look again
            self._tick(spans)
            self._flush()
            if self.clock != "stream":  # a stream's backlog is its client's choice (faster than real time)
                self._check_pace()

    def _sleep(self, seconds: float) -> None:
        """Waits for a frame, a command or `seconds`."""
        self._wake.wait(max(0.0, seconds))
        self._wake.clear()

    def _plan(self):
        """The spans of rows to tick now (None: every occupied row, in one batch), or WAIT after
        waiting. The input clock waits for every row's frame; the realtime clock ticks phase groups
        (`serving.phases`)."""
        occupied = [i for i, r in enumerate(self.rows) if r is not None]
        ready = [i for i in occupied if self.rows[i].cursor is not None or self.rows[i].seat.inbox]
        if self.clock == "input":
            if len(ready) == len(occupied):
                return None
            self._sleep(1.0)
            return WAIT
        if self.clock == "stream":  # one batch as soon as any row has a frame; the others sit it out
            if ready:
                return None
            self._sleep(1.0)
            return WAIT
        now = time.monotonic()
        arrivals = [self.rows[i].seat.inbox[0][0] for i in ready if self.rows[i].cursor is None]
        expected = {i: r.seat.last_arrival + FRAME_S for i in occupied
                    if (r := self.rows[i]).cursor is None and r.seat.last_arrival is not None}
        p = plan(occupied, ready, min(arrivals) if arrivals else None, now, self.costs, expected)
        if p.spans is None:
            self._sleep(1.0 if p.wake is None else p.wake - now)
            return WAIT
        return p.spans

    def _check_pace(self) -> None:
        """Says once, when conversations' input piles up, that the machine cannot keep real time
        (a log line with the numbers, `openmoshi_behind_real_time_total`); input beyond
        INBOX_FRAMES is then dropped, oldest first, so that latency stays bounded."""
        backlog = max((len(r.seat.inbox) for r in self.rows if r is not None and r.cursor is None), default=0)
        if backlog <= 1:
            self.behind = False
        elif backlog >= BEHIND_FRAMES and not self.behind:
            self.behind = True
            self.metrics.inc("openmoshi_behind_real_time_total")
            occupied = sum(r is not None for r in self.rows)
            log.warning("model_behind_real_time", extra={"fields": {
                "conversations": occupied, "backlog_frames": backlog,
                "tick_ms": {n: round(1000 * c, 1) for n, c in sorted(self.costs.ema.items())},
                "frame_ms": 1000 * FRAME_S, "action": f"input beyond {INBOX_FRAMES} frames is dropped, oldest first; "
                "serve fewer conversations (--max-sessions) or use a faster device"}})

    def _flush(self) -> None:
        """Hands the events gathered since the last flush to the sink: one hop per tick."""
        if self._events:
            events, self._events = self._events, []
            try:
                self.sink(events)
            except Exception:  # the event loop is gone (stopping): nobody to tell
                log.debug("sink failed", exc_info=True)

    # ------------------------------------------------------------------ commands

    def _row_of(self, seat: Seat) -> int | None:
        return next((i for i, r in enumerate(self.rows) if r is not None and r.seat is seat), None)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                self._apply(command)
            except Exception as e:  # e.g. a setting the row's tensors cannot hold: that conversation only
                self.command_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.error("model_command_failed", exc_info=True, extra={"fields": {
                    "command": type(command).__name__, "error": self.last_error,
                    "action": "that conversation was ended"}})
                self.metrics.inc("openmoshi_errors_total", kind="model_command")
                row = self._row_of(command.seat)
                self._end([self.rows[row]] if row is not None else [], COMMAND_FAILED_MESSAGE)
                if row is None:
                    self._events.append(Ended(command.seat, COMMAND_FAILED_MESSAGE))
        self._compact()

    def _apply(self, command) -> None:
        row = self._row_of(command.seat)
        if isinstance(command, Leave):
            if row is not None:
                self.rows[row] = None
            return
        if isinstance(command, Configure):
            if row is not None:
                self.engine.configure(row, command.sampling)
            return
        if isinstance(command, Inject):
            if row is not None:
                self.rows[row].injected.extend((t, command.tag) for t in command.tokens)
            return
        if isinstance(command, CancelInject):
            if row is not None:
                r = self.rows[row]
                r.injected = deque(x for x in r.injected if command.tag is not None and x[1] != command.tag)
            return
        if row is None:  # a join: the lowest free row
            row = self.rows.index(None)
        r = self.rows[row] = _Row(command.seat, command)
        self.engine.reset(self.engine.mask(row))
        self.engine.configure(row, command.sampling, command.seeds or (secrets.randbits(62), secrets.randbits(62)))
        if command.prompt is None:
            self._events.append(Ready(command.seat))
        else:
            r.cursor, r.steps = self.prompts.start(self.engine, row, command.prompt, command.persona)

    def _compact(self) -> None:
        """Moves the highest conversation into the lowest free row until the occupied rows are a
        prefix, so that ticks run on as few rows as the conversations need."""
        while True:
            busy = [i for i, r in enumerate(self.rows) if r is not None]
            if not busy or None not in self.rows[:busy[-1]]:
                return
            src, dst = busy[-1], self.rows.index(None)
            self.engine.move(src, dst)
            self.rows[dst], self.rows[src] = self.rows[src], None

    # ------------------------------------------------------------------ ticks

    def tick_input(self, start: int, n: int, rows: list[int]) -> TickInput:
        """The TickInput of `rows` in the span [start, start + n): each one's next frame (silence
        when it has none: the Driver of tests and a legacy whole-batch tick), or its prompt."""
        pcm = np.zeros((n, 1, FRAME_SIZE), dtype=np.float32)
        active, first = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        hold = np.zeros(n, dtype=bool) if self.clock == "stream" else None
        prompts, inject, silent = {}, {}, 0
        for i in rows:
            r, k = self.rows[i], i - start
            active[k] = True
            first[k] = r.steps == 0 and r.join.prompt is None
            if r.cursor is not None:
                prompts[k] = r.cursor  # its prompt phase: no input read
            elif r.seat.inbox:
                # The stream clock reads a row's first frame twice (its first step reads only initial
                # tokens; the encoder restarts after it): Kyutai STT's policy, see `lm.stt`.
                pcm[k, 0] = (r.seat.inbox[0] if hold is not None and first[k] else r.seat.inbox.popleft())[1]
            elif hold is not None:  # the stream clock: this row sits the tick out
                active[k], hold[k], first[k] = False, True, False
            else:
                silent += 1
            if active[k] and r.cursor is None:
                token, tag = r.injected.popleft() if r.injected else (None, None)
                if token is not None:
                    inject[k] = token
                r.tags.append(tag)
                while len(r.tags) > self.prompts.cfg.max_delay + 1:
                    r.tags.popleft()
        if silent:
            self.metrics.inc("openmoshi_silence_frames_total", silent)
        return TickInput(pcm, active, first, max(self.rows[i].steps for i in rows),
                         listen=len(prompts) < len(rows), prompts=prompts, start=start, hold=hold, inject=inject)

    def _groups(self, spans: list[tuple[int, int]] | None) -> list[tuple[int, int, list[int]]]:
        """(start, n, rows) of each tick: every occupied row in the smallest bucket when spans is
        None; else a span from row 0 takes its bucket when the rows it adds are free (its graphs),
        and any other span exactly its rows."""
        occupied = [i for i, r in enumerate(self.rows) if r is not None]
        if spans is None:
            return [(0, self.engine.fit(occupied[-1] + 1), occupied)]
        out = []
        for a, b in spans:
            n = b - a
            if a == 0:
                fit = self.engine.fit(b)
                if all(self.rows[i] is None for i in range(b, fit)):
                    n = fit
            out.append((a, n, list(range(a, b))))
        return out

    def _tick(self, spans: list[tuple[int, int]] | None = None) -> None:
        """Ticks the rows of `spans` (None: every occupied row at once), each span in its own call;
        a tick that raises ends its conversations (`_tick_failed`) and the others go on."""
        for start, n, rows in self._groups(spans):
            began = time.monotonic()
            try:
                self._tick_rows(start, n, rows)
            except Exception as e:  # one bad tick ends its conversations, not the server
                self._tick_failed(e, rows)
            ended = time.monotonic()
            self.costs.record(n, began, ended)
            self.metrics.observe_step(ended - began)

    def _tick_rows(self, start: int, n: int, rows: list[int]) -> None:
        inp = self.tick_input(start, n, rows)
        self.metrics.observe_batch(n)
        out = tick(self.engine, inp, self.prompts, codes_out=self.recorder is not None)
        for i in rows:
            r, k = self.rows[i], i - start
            if not inp.active[k]:
                continue  # it sat this tick out (the stream clock)
            r.steps += 1
            if r.cursor is not None:
                if self.prompts.stepped(self.engine, i, r.cursor, r.join.persona):
                    r.cursor = None
                    self._events.append(Ready(r.seat))
                continue
            if self.recorder is not None:
                self.recorder(r.seat, inp.pcm[k, 0], out.text[k], out.audio[k], out.valid[k])
            if out.valid[k]:
                pcm = out.pcm[k] if out.pcm is not None else np.zeros(0, np.float32)
                prs = None if out.prs is None else tuple(out.prs[k].tolist())
                # The frame out now is max_delay steps old: its text is the one forced (or not) then.
                tag = r.tags[0] if len(r.tags) > self.prompts.cfg.max_delay else None
                self._events.append(Frame(r.seat, pcm, self._piece(out.text[k]), out.text[k], prs, tag))

    def _tick_failed(self, e: Exception, rows: list[int]) -> None:
        self.tick_errors += 1
        self.last_error = f"{type(e).__name__}: {e}"[:300]
        occupied = [self.rows[i] for i in rows if self.rows[i] is not None]
        log.error("model_step_failed", exc_info=True, extra={"fields": {
            "conversations": len(occupied), "error": self.last_error,
            "action": "their conversations were ended and their states reset; the loop goes on"}})
        self.metrics.inc("openmoshi_errors_total", kind="model_step")
        seats = {r.seat for r in occupied}
        self._events = [e for e in self._events if not (isinstance(e, Frame) and e.seat in seats)]
        self._end(occupied, STEP_FAILED_MESSAGE)

    def _end(self, rows: list[_Row], message: str, reset: bool = True) -> None:
        """Ends these conversations: out of the rows, their states reset (when the engine can
        still be trusted), their clients told. Raises only when even a reset fails: then the
        whole loop restarts."""
        indices = [i for i, r in enumerate(self.rows) if r is not None and r in rows]
        for i in indices:
            self.rows[i] = None
        if reset and indices and self.engine is not None:
            self.engine.reset(self.engine.mask(*indices))
        self._events.extend(Ended(r.seat, message) for r in rows)

    def _piece(self, token: int) -> str | None:
        if token in HIDDEN_TEXT_IDS or token < 0:
            return None
        piece = self._pieces.get(token)
        if piece is None:
            try:
                piece = self.tokenizer.id_to_piece(token).replace("\u2581", " ")
            except Exception:  # an id outside the vocabulary of a mismatched tokenizer
                piece = ""
            self._pieces[token] = piece
        return piece or None
