"""The batched model loop of the server: one Mimi encode, one LM step and one Mimi decode per 80 ms
frame for every conversation at once, in a worker thread off the event loop.

Each conversation owns a slot b of the states, made once for B = max sessions. The worker ticks
once per frame, on the first n slots only, n = the occupied slots rounded up to a bucket (1, 2, 4,
..., B): the states' prefixes [0, n) are views, so a tick costs what its conversations need and
an idle slot costs nothing.

    inbox[b] (PCM frames from the client) ──> pcm [n, 1, F] ──Mimi encode──> codes [n, K, 1]
        ──LM step (active = occupied slots)──> text [n], audio [n, Q] ──Mimi decode──> pcm [n, 1, F]
        ──> on_frame(b, pcm, text piece) for the slots whose frame is complete (`valid`)

Conversations take the lowest free slot; when one leaves a hole below busy slots, the highest
conversation's states (LM caches and streams, Mimi states, sampling settings, seeds) move into the
hole between ticks, so the occupied slots stay [0, k). Every slot samples from its own seeded
streams (`text_seed`/`audio_seed`, random when not given): what a conversation hears depends on its
input and seeds only, never on the others or on which slot it is in.

Frame policy, per slot, as the official server: every input frame is encoded and given to one LM
step; the first step only reads initial tokens, and right after the first frame the slot's Mimi
encoder state is reset so the next frame starts with fresh left padding; each step's output is
decoded and sent at once. The clock: a tick happens as soon as every occupied slot has a frame
waiting, or at the latest `TICK_SLACK` after the previous tick; a slot whose client is late reads
silence for that tick, so one slow client never holds back the others. The input clock
(`clock="input"`, for tests and reproducible runs) ticks only when every occupied slot has its next
frame, never inserts silence and never drops input: a conversation's output is then a function of
its input alone. `recorder(slot, pcm_in, text, audio, valid)`, when set, sees every slot's tick. Joining, leaving and
restarting are commands applied by the worker between ticks; they reset only that slot (LM state,
Mimi encoder and decoder state, sampling settings).

Personas (PersonaPlex): a slot opened with a `persona.Prompt` runs its prompt phase first, as
forced frames in the same ticks as the other slots (the user's side forced to the sine codes, no
input read, nothing sent), and gets `on_ready` (the handshake) only after it. The state a prompt
leaves before its last step (which samples the conversation's first frame with the slot's own
seeds) is kept per persona key (voice, text) in a small LRU (`persona_cache`), and the next
conversation with that persona starts from a copy of it and runs that last step only.

On CUDA the three steps run as CUDA graphs (`openmoshi.accel.cuda_graph`; `cuda_graph=False` or
OPENMOSHI_NO_CUDA_GRAPH=1 for eager), one set per bucket. The LM step's attention reads the window
of the furthest occupied slot, known on the host (`Slot.steps`), so it shrinks again when
conversations restart; every bucket's and window's graph is captured when the worker starts,
before any conversation, since a capture takes far longer than a tick. Their outputs are consumed
within the tick, before the next call.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from openmoshi.accel.cuda_graph import GraphedStep, graphed
from openmoshi.lm import generate as G
from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID
from openmoshi.lm.persona import PromptCursor
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.memory import available_bytes, gb
from openmoshi.serving.metrics import Metrics

log = logging.getLogger("openmoshi.serving.server")

FRAME_SECONDS = 0.08
TICK_SLACK = 0.1  # latest tick: 80 ms plus 20 ms of grace for a client's network jitter
INBOX_FRAMES = 25  # input frames kept per slot (2 s); the oldest are dropped beyond
PERSONA_CACHE = 16  # persona states kept at most ...
PERSONA_CACHE_BYTES = 2 * 1024 ** 3  # ... and their bytes (a 7B's: about 0.5 MB per prompt frame)
HIDDEN_TEXT_IDS = (TEXT_END_PADDING_ID, TEXT_PADDING_ID)  # never shown to users
CLOCKS = ("realtime", "input")
MAX_RESTARTS, RESTART_WINDOW = 3, 60.0  # a model loop that dies more often than this is given up
STEP_FAILED_MESSAGE = ("internal error: the model failed on this frame and the conversation was ended (the "
                       "server goes on); reconnect to start a new conversation")
COMMAND_FAILED_MESSAGE = ("internal error: the model could not apply this conversation's settings, so it was "
                          "ended (the server goes on); reconnect to start a new conversation")
LOOP_CRASHED_MESSAGE = ("internal error: the model loop failed and is restarting; this conversation was "
                        "ended: reconnect to start a new one")


@dataclass
class Slot:
    """One conversation's place in the batch. `on_ready()` and `on_frame(pcm [F] float32, text)`
    are called from the worker thread; the server wraps them to hop onto its event loop."""

    index: int  # its row in the states; the worker moves it down when a slot below frees
    sampling: SamplingConfig
    on_ready: Callable[[], None]
    on_frame: Callable[[np.ndarray, str | None], None]
    seeds: tuple[int, int] | None = None  # text and audio seeds (None: random at each (re)start)
    on_error: Callable[[str], None] | None = None  # the model loop ended this conversation (its slot is reset)
    prompt: Any = None  # persona.Prompt run before the handshake, None for none
    persona: tuple | None = None  # its key in the persona cache, e.g. (voice name, text)
    cursor: Any = None  # persona.PromptCursor while the prompt runs
    inbox: deque = field(default_factory=lambda: deque(maxlen=INBOX_FRAMES))  # unbounded with the input clock
    steps: int = 0
    frames_in: int = 0
    silent_ticks: int = 0


def buckets(max_slots: int) -> list[int]:
    """Batch sizes a tick runs at: powers of two, and max_slots itself."""
    sizes, n = [], 1
    while n < max_slots:
        sizes.append(n)
        n *= 2
    return sizes + [max_slots]


@dataclass
class _Bucket:
    """The steps over the states' first `size` slots (views), graphed on CUDA."""

    size: int
    gen: G.GenState
    enc: Any
    dec: Any
    encode: Callable
    decode: Callable
    lm_step: GraphedStep


class Batcher:
    """Owns the model states of `max_slots` conversations and the worker thread that steps them."""

    def __init__(self, lm, mimi, tokenizer: Any, max_slots: int, sampling: SamplingConfig = SamplingConfig(),
                 metrics: Metrics | None = None, condition: dict | None = None, cuda_graph: bool | None = None,
                 cfg_coef: float = 1.0, negative: dict | None = None, clock: str = "realtime"):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.clock = clock
        self.recorder: Callable[[Slot, np.ndarray, int, np.ndarray, bool], None] | None = None
        if (lm.condition_provider is not None) != (condition is not None):
            raise ValueError("a conditioned model needs condition attributes (e.g. Hibiki's "
                             "{'description': 'very_good'}) and an unconditioned one takes none")
        if (cfg_coef != 1.0) != (negative is not None) or (negative is not None and condition is None):
            raise ValueError("classifier-free guidance (cfg_coef != 1) needs a conditioned model and a "
                             "negative condition (e.g. Hibiki's {'description': 'very_bad'}); use cfg_coef=1")
        self.condition, self.negative, self.cfg_coef = condition, negative, cfg_coef
        if mimi.num_codebooks < lm.cfg.num_user_codebooks:
            raise ValueError(f"Mimi produces {mimi.num_codebooks} codebooks, the LM reads {lm.cfg.num_user_codebooks}")
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.max_slots = max_slots
        self._check_memory()
        self.sampling = sampling
        self.cuda_graph = cuda_graph  # None: CUDA graphs on CUDA (see openmoshi.accel.cuda_graph)
        self.frame_size = mimi.frame_size
        self.metrics = metrics or Metrics()
        self._slots: list[Slot | None] = [None] * max_slots  # worker's view
        self._reserved = [False] * max_slots  # event loop's view, under _lock
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the worker has its states (and graphs), or crashed
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, str] = {}
        self.on_free: Callable[[], None] | None = None  # called from the worker when a slot frees
        self.on_fatal: Callable[[], None] | None = None  # called from the worker when it gives up (`crashed`)
        self.persona_cache: OrderedDict[tuple, G.SlotSnapshot] = OrderedDict()  # worker's, LRU
        self.persona_hits = 0

    def _check_memory(self) -> None:
        """The states of every slot (mostly the KV cache at full context) are allocated when the
        worker starts: refuse at once, with the numbers, when they cannot fit."""
        device = next(self.lm.parameters()).device
        need = G.state_bytes(self.lm, self.max_slots, self.cfg_coef)
        free = available_bytes(device)
        if free is None or need <= 0.9 * free:
            return
        per = G.state_bytes(self.lm, 1, self.cfg_coef)
        fit = int(0.9 * free // per)
        raise ValueError(f"--max-sessions {self.max_slots} needs {gb(need)} for the conversations' states "
                         f"({gb(per)} each, mostly the KV cache at the full {self.lm.cfg.context}-frame "
                         f"context), but {device} has {gb(free)} free: use --max-sessions {fit} or fewer"
                         + ("" if fit else ", or a smaller dtype or model"))

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="openmoshi-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        with self._lock:
            return sum(self._reserved)

    def open(self, sampling: SamplingConfig, on_ready, on_frame, seeds: tuple[int, int] | None = None,
             prompt=None, persona: tuple | None = None, on_error=None) -> Slot | None:
        """Reserves a slot (None when all are taken); `on_ready` fires once it has been reset, and
        has run `prompt` (a persona's, cached under the key `persona` when given)."""
        with self._lock:
            free = [i for i, taken in enumerate(self._reserved) if not taken]
            if not free:
                return None
            self._reserved[free[0]] = True
            self.metrics.set_active(sum(self._reserved))
        slot = Slot(free[0], sampling, on_ready, on_frame, seeds, on_error, prompt, persona)
        if self.clock == "input":
            slot.inbox = deque()  # never drop input: the output must follow from all of it
        self._command("join", slot)
        return slot

    def close(self, slot: Slot) -> None:
        self._command("leave", slot)

    def restart(self, slot: Slot) -> None:
        self._command("join", slot)

    def set_sampling(self, slot: Slot, sampling: SamplingConfig) -> None:
        """Changes a conversation's sampling settings from its next frame on, keeping its state."""
        slot.sampling = sampling
        self._command("sampling", slot)

    def push(self, slot: Slot, pcm: np.ndarray) -> int:
        """Queues whole frames of PCM [N * F]; returns how many old frames were dropped to make room."""
        dropped = 0
        for i in range(0, pcm.shape[0] - self.frame_size + 1, self.frame_size):
            if len(slot.inbox) == slot.inbox.maxlen:
                dropped += 1
            slot.inbox.append(pcm[i:i + self.frame_size])
            slot.frames_in += 1
        if dropped:
            self.metrics.inc("openmoshi_frames_dropped_total", dropped, direction="in")
        self._wake.set()
        return dropped

    def _command(self, kind: str, slot: Slot) -> None:
        self._commands.put((kind, slot))
        self._wake.set()

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:
        """The worker: the model loop, restarted (fresh states, the conversations it held ended
        with an error) when it dies; given up after MAX_RESTARTS deaths within RESTART_WINDOW s,
        when it is `crashed` for good and `on_fatal` tells the server."""
        deaths: deque = deque(maxlen=MAX_RESTARTS + 1)
        while not self._stop.is_set():
            try:
                with torch.no_grad():
                    self._loop()
                return
            except Exception as e:
                log.exception("model_loop_crashed")
                self.metrics.inc("openmoshi_errors_total", kind="batcher")
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                self._end_all(LOOP_CRASHED_MESSAGE)
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

    crashed = False  # the model loop died for good (see _run): the server cannot serve
    restarts = 0  # times the model loop was restarted after dying
    tick_errors = 0  # ticks that raised (their conversations were ended, the loop went on)
    command_errors = 0  # joins or setting changes that raised (that conversation was ended)
    last_error: str | None = None
    heartbeat = 0.0  # time.monotonic() of the worker's last pass through its loop (a stall check reads it)

    def stalled(self, after: float) -> bool:
        """Whether the worker has not come round its loop for `after` seconds (a hung step)."""
        return self._thread is not None and self.ready.is_set() and time.monotonic() - self.heartbeat > after

    def _end_all(self, message: str) -> None:
        """The model loop died: every conversation it held is ended (its client told); their slots
        stay reserved until each conversation's `close` comes, as always."""
        for i, slot in enumerate(self._slots):
            if slot is not None:
                self._slots[i] = None
                self._notify_error(slot, message)

    def _fail(self, slots: list[Slot], message: str) -> None:
        """Ends these conversations (a command or a tick failed on them): out of the batch, their
        states reset, their clients told. Their reservations end with their `close`. Raises only
        when the states cannot even be reset: then the whole loop restarts."""
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        for slot in slots:
            if self._slots[slot.index] is slot:
                self._slots[slot.index] = None
            slot.cursor = None
            mask[slot.index] = True
        G.reset_slots(self.gen, mask)
        self.enc.reset(mask)
        self.dec.reset(mask)
        for slot in slots:
            self._notify_error(slot, message)

    @staticmethod
    def _notify_error(slot: Slot, message: str) -> None:
        if slot.on_error is None:
            return
        try:
            slot.on_error(message)
        except Exception:  # its event loop is gone (the server is stopping): nobody to tell
            log.debug("on_error failed", exc_info=True)

    def _init_states(self) -> None:
        """Model states of every slot, and the (graphed) steps over each bucket's prefix of them;
        captures the graphs."""
        B, lm, mimi = self.max_slots, self.lm, self.mimi
        self.device = next(lm.parameters()).device
        self.gen = G.init_state(lm, B, self.sampling, max_k=max(self.sampling.top_k, 250),
                                max_k_text=max(self.sampling.top_k_text, 25), cfg_coef=self.cfg_coef,
                                slot_streams=True)
        if self.condition is not None:  # every slot, once: resetting a slot keeps its condition
            negative = lm.condition_sum([self.negative] * B) if self.negative is not None else None
            G.set_condition(self.gen, lm.condition_sum([self.condition] * B), negative=negative)
        self.enc = mimi.init_encode_state(B)
        self.dec = mimi.init_decode_state(B)
        self.mimi_dtype = next(mimi.parameters()).dtype
        kv = sum(t.numel() * t.element_size() for t in (*self.gen.temporal.keys, *self.gen.temporal.values))
        log.info("kv_cache", extra={"fields": {"slots": B, "gb": round(kv / 1e9, 3),
                                               "gb_per_slot": round(kv / B / 1e9, 4), "preallocated": True}})
        self.buckets = {n: self._bucket(n) for n in buckets(B)}
        if self.buckets[B].lm_step.enabled:
            self._capture()

    def _bucket(self, n: int) -> _Bucket:
        gen, enc, dec = G.prefix(self.gen, n), self.enc.prefix(n), self.dec.prefix(n)
        graphs, device, mimi = self.cuda_graph, self.device, self.mimi
        return _Bucket(n, gen, enc, dec,
                       graphed(lambda pcm: mimi.encode_step(pcm, enc), graphs, device, name=f"mimi_encode_{n}"),
                       graphed(lambda codes: mimi.decode_step(codes, dec), graphs, device, name=f"mimi_decode_{n}"),
                       GraphedStep(self.lm, gen, graphs))

    def _capture(self) -> None:
        """Every graph of the default sampling settings, before the first conversation, with idle
        slots; the states are reset after. Other sampler flags are captured when first needed."""
        start = time.monotonic()
        F, K, graphs = self.frame_size, self.mimi.num_codebooks, 0
        for n, b in self.buckets.items():
            idle = torch.zeros(n, dtype=torch.bool, device=self.device)
            for _ in range(b.encode.warmup + 1):  # warm-up calls, then capture and replay
                codes = b.encode(torch.zeros(n, 1, F, device=self.device, dtype=self.mimi_dtype))
                b.decode(torch.zeros(n, K, 1, dtype=torch.long, device=self.device))
            graphs += b.lm_step.capture_all(codes[:, :, 0], idle) + 2
        everyone = torch.ones(self.max_slots, dtype=torch.bool, device=self.device)
        G.reset_slots(self.gen)
        self.enc.reset(everyone)
        self.dec.reset(everyone)
        seconds = round(time.monotonic() - start, 2)
        log.info("cuda_graphs_ready", extra={"fields": {"buckets": list(self.buckets), "graphs": graphs,
                                                        "seconds": seconds}})

    def _loop(self) -> None:
        self._slots = [None] * self.max_slots  # after a restart, the conversations held were ended
        self.buckets = self.gen = self.enc = self.dec = None  # a restart frees the old states first
        self._init_states()
        self.ready.set()
        last_tick = time.monotonic()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._apply_commands()
            occupied = [s for s in self._slots if s is not None]
            if not occupied:
                self._wake.wait(0.1)
                self._wake.clear()
                last_tick = time.monotonic()
                continue
            deadline = last_tick + TICK_SLACK if self.clock == "realtime" else float("inf")
            while not all(s.inbox or s.cursor for s in occupied) and time.monotonic() < deadline:
                self._wake.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                self._wake.clear()
                self.heartbeat = time.monotonic()
                if not self._commands.empty() or self._stop.is_set():
                    break
            if not self._commands.empty():
                continue  # a join/leave changes who takes part: apply it first
            if self.clock == "input" and not all(s.inbox or s.cursor for s in occupied):
                continue  # stopping: the input clock never ticks on missing frames
            last_tick = time.monotonic()
            try:
                self._tick(occupied)
            except Exception as e:  # one bad tick ends its conversations, not the server
                self._tick_failed(occupied, e)
            self.metrics.observe_step(time.monotonic() - last_tick)

    def _tick_failed(self, occupied: list[Slot], e: Exception) -> None:
        self.tick_errors += 1
        self.last_error = f"{type(e).__name__}: {e}"[:300]
        log.error("model_step_failed", exc_info=True, extra={"fields": {
            "conversations": len(occupied), "error": self.last_error,
            "action": "their conversations were ended and their states reset; the loop goes on"}})
        self.metrics.inc("openmoshi_errors_total", kind="model_step")
        self._fail(occupied, STEP_FAILED_MESSAGE)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, slot = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                self._apply(kind, slot)
            except Exception as e:  # e.g. a setting the slot's tensors cannot hold: that conversation only
                self.command_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.error("model_command_failed", exc_info=True, extra={"fields": {
                    "command": kind, "error": self.last_error, "action": "that conversation was ended"}})
                self.metrics.inc("openmoshi_errors_total", kind="model_command")
                self._fail([slot], COMMAND_FAILED_MESSAGE)
        self._compact()

    def _apply(self, kind: str, slot: Slot) -> None:
        if kind == "join":
            self._slots[slot.index] = slot
            slot.steps = 0
            mask = self._mask(slot.index)
            G.reset_slots(self.gen, mask)
            G.set_sampling(self.gen, slot.sampling, mask)
            seeds = slot.seeds or (secrets.randbits(62), secrets.randbits(62))
            G.set_seeds(self.gen, *seeds, mask)
            self.enc.reset(mask)
            self.dec.reset(mask)
            if slot.prompt is None:
                slot.on_ready()
            else:
                self._start_prompt(slot)
        elif kind == "sampling":
            if self._slots[slot.index] is slot:
                G.set_sampling(self.gen, slot.sampling, self._mask(slot.index))
        elif kind == "leave":
            if self._slots[slot.index] is slot:
                self._slots[slot.index] = None
            with self._lock:
                self._reserved[slot.index] = False
                self.metrics.set_active(sum(self._reserved))
            if self.on_free is not None:
                self.on_free()  # e.g. the server's waiting line takes the slot

    def _start_prompt(self, slot: Slot) -> None:
        """The slot runs its persona's prompt, from the cached state when there is one."""
        slot.cursor = PromptCursor(slot.prompt, self.lm.cfg)
        snap = self.persona_cache.get(slot.persona) if slot.persona is not None else None
        if snap is not None:
            G.load_slot(self.gen, slot.index, snap)
            slot.cursor.step = slot.steps = slot.prompt.frames - 1
            self.persona_cache.move_to_end(slot.persona)
            self.persona_hits += 1

    def _prompt_stepped(self, slot: Slot) -> None:
        """After a tick of the slot's prompt: keep the persona's state before the last step, and
        at the end reset the slot's Mimi states and let the conversation start."""
        cursor = slot.cursor
        cursor.after_step(self.gen, slot.index)
        if (cursor.step == slot.prompt.frames - 1 and slot.persona is not None and not self.gen.guided
                and slot.persona not in self.persona_cache):
            self.persona_cache[slot.persona] = G.save_slot(self.gen, slot.index)
            while len(self.persona_cache) > PERSONA_CACHE or (
                    len(self.persona_cache) > 1 and sum(s.nbytes for s in self.persona_cache.values()) > PERSONA_CACHE_BYTES):
                self.persona_cache.popitem(last=False)
        if cursor.done:
            slot.cursor = None
            mask = self._mask(slot.index)
            self.enc.reset(mask)
            self.dec.reset(mask)
            slot.on_ready()

    def _mask(self, index: int) -> torch.Tensor:
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[index] = True
        return mask

    def _compact(self) -> None:
        """Moves the highest conversation into the lowest free slot until the occupied slots are a
        prefix, so that ticks run on as few slots as the conversations need."""
        while True:
            with self._lock:
                holes = [i for i, taken in enumerate(self._reserved) if not taken]
                busy = [i for i, s in enumerate(self._slots) if s is not None]
                if not holes or not busy or busy[-1] < holes[0]:
                    return
                src, dst = busy[-1], holes[0]
                self._reserved[dst], self._reserved[src] = True, False
            slot = self._slots[src]
            G.move_slot(self.gen, src, dst)
            self.enc.move(src, dst)
            self.dec.move(src, dst)
            self._slots[dst], self._slots[src] = slot, None
            slot.index = dst

    def _tick(self, occupied: list[Slot]) -> None:
        used = max(s.index for s in occupied) + 1
        b = self.buckets[next(n for n in self.buckets if n >= used)]
        n, F = b.size, self.frame_size
        pcm = np.zeros((n, 1, F), dtype=np.float32)
        active = torch.zeros(n, dtype=torch.bool)
        first = torch.zeros(n, dtype=torch.bool)
        silent = 0
        prompting = [s for s in occupied if s.cursor is not None]
        for s in occupied:
            active[s.index] = True
            first[s.index] = s.steps == 0 and s.prompt is None
            if s.cursor is not None:
                continue  # its prompt phase: no input read
            if s.inbox:
                pcm[s.index, 0] = s.inbox.popleft()
            else:
                s.silent_ticks += 1
                silent += 1
        if silent:
            self.metrics.inc("openmoshi_silence_frames_total", silent)
        self.metrics.observe_batch(n)
        only_prompts = len(prompting) == len(occupied)  # nobody to hear or to answer: no Mimi this tick
        if only_prompts:
            codes = torch.zeros(n, self.mimi.num_codebooks, 1, dtype=torch.long, device=self.device)
        else:
            codes = b.encode(torch.from_numpy(pcm).to(self.device, self.mimi_dtype))  # [n, K, 1]
        if bool(first.any()):
            # The first frame is in the model's past: restart the encoder with fresh left padding.
            b.enc.reset(first.to(self.device))
        # The view's host-side flags follow the full state's (set_sampling updates those).
        b.gen.greedy_text, b.gen.greedy_audio = self.gen.greedy_text, self.gen.greedy_audio
        b.gen.shaped_text = self.gen.shaped_text
        # Every occupied slot is active and at its own step count: the furthest one bounds the window.
        user, forcing = codes[:, :, 0], {}
        if prompting:  # those slots' frames are forced, their user side the prompt's
            user, forcing["forced"], forcing["embeddings"] = self._prompt_inputs(prompting, user)
        out = b.lm_step(user, active.to(self.device), position=max(s.steps for s in occupied), **forcing)
        if only_prompts:
            for s in occupied:
                s.steps += 1
                self._prompt_stepped(s)
            return
        valid = out.valid
        audio = torch.where(valid[:, None], out.audio, torch.zeros_like(out.audio))  # [n, Q]
        pcm_out = b.decode(audio[:, :, None])  # [n, 1, F]
        # Slots without a complete frame yet decode placeholders: their decoder starts afresh.
        b.dec.reset(~valid)
        pcm_out = pcm_out[:, 0].to("cpu", torch.float32, copy=True).numpy()  # a copy: slots keep their frame
        valid = valid.cpu().tolist()
        text = out.text.cpu().tolist()
        audio_codes = out.audio.cpu().numpy() if self.recorder is not None else None
        for s in occupied:
            s.steps += 1
            if s.cursor is not None:
                self._prompt_stepped(s)
                continue
            if self.recorder is not None:
                self.recorder(s, pcm[s.index, 0], text[s.index], audio_codes[s.index], valid[s.index])
            if valid[s.index]:
                s.on_frame(pcm_out[s.index], self._piece(text[s.index]))

    def _prompt_inputs(self, prompting: list[Slot], codes: torch.Tensor):
        """(user codes, forced tokens, input embeddings) of a tick with slots in their prompt."""
        n, cfg = codes.shape[0], self.lm.cfg
        user = codes.clone()
        forced = torch.full((n, 1 + cfg.gen_q), G.NOT_FORCED, dtype=torch.long)
        emb, use = None, torch.zeros(n, dtype=torch.bool)
        for s in prompting:
            u, f, e = s.cursor.inputs()
            user[s.index, :u.shape[0]] = u.to(user.device)
            forced[s.index] = f
            if e is not None:
                emb = torch.zeros(n, 1, cfg.dim) if emb is None else emb
                emb[s.index, 0], use[s.index] = e, True
        embeddings = None if emb is None else (emb.to(self.device), use.to(self.device))
        return user, forced.to(self.device), embeddings

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
