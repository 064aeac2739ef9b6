"""The model loop of a Kyutai TTS server: streams of text in, frames of speech out, many streams
batched in one step (`/api/tts_streaming`, see `serving.tts`).

    engine = TTSEngine(lm, mimi, spec, settings, batch, cross_len, max_prefix)
    loop = TTSLoop(lambda: engine, batch, sink, tokenizer, lm.cfg)
    loop.submit(Speak(seat, values, prefix, sampling, seeds))   # a stream starts: its voice, settings
    loop.submit(Words(seat, entries))                          # words as the client sends them
    loop.submit(Words(seat, (), complete=True))                # the end of its text (Eos)

The worker is the speech model loop's (`serving.loop.ModelLoop`: commands, rows, compaction,
failures, restarts), with a TTS tick: every occupied row whose script can step (`lm.tts.ready`:
it holds the words the step may read, its lookahead included, or its text is complete) steps in
one `lm.tts.tts_step` over the smallest bucket of rows; a row waiting for its client's next words
sits the tick out, its state untouched, so what a stream says depends only on its own text,
voice and seed, never on how its text was chunked, its row or its neighbours. Steps run as fast as
they go (a client buffers the audio), as moshi-server's TTS does.

Per stepped row, events for the session: `Frame(seat, pcm)` for each frame of audio (from
`delay_steps` on, the audio prefix's frames cut), `Said(seat, word, start, stop)` once a word's end
is known (`lm.tts.word_timings`: seconds of this stream's audio), and `Finished(seat)` after its
last frame: the row then stops stepping until its session leaves.

Mimi decodes the rows that have audio this tick in one call; a row mid-stream that does not
(waiting for words) keeps its decoder state (saved and restored around the call), a row whose
audio has not started is reset after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from openmoshi.engine.engine import buckets
from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.lm.tts import (TTSSettings, TTSSpec, TTSState, finished, init_tts_state, move_slot, ready,
                              start_slot, tts_step, word_timings)
from openmoshi.lm.tts_script import Entry
from openmoshi.serving.loop import WAIT, Frame, Leave, ModelLoop, Ready, Seat, _Row


# ----------------------------------------------------------------------------- commands and events


@dataclass(frozen=True)
class Speak:
    """A stream starts in `seat`: its condition values (`lm.tts.condition_values`), audio prefix
    (codes [n_q, P], prefix-conditioned models), sampling settings and seeds (text, audio)."""

    seat: Seat
    values: dict
    prefix: torch.Tensor | None = None
    sampling: SamplingConfig | None = None  # None: the server's TTSSettings
    seeds: tuple[int, int] = (42, 42)


@dataclass(frozen=True)
class Words:
    """Entries (`tts_script.script_to_entries`) for the end of a stream's script; `complete`: no
    more will come (the client's Eos)."""

    seat: Seat
    entries: tuple[Entry, ...]
    complete: bool = False


@dataclass(frozen=True)
class Said:
    """A word said by a stream, once its end is known: seconds of the stream's audio."""

    seat: Seat
    text: str
    start: float
    stop: float


@dataclass(frozen=True)
class Finished:
    """The stream's last frame has been sent."""

    seat: Seat


# ----------------------------------------------------------------------------- the engine


class TTSEngine:
    """The TTS state of `batch` slots, Mimi's decoder states, and the steps over their first n."""

    def __init__(self, lm, mimi, spec: TTSSpec, settings: TTSSettings, batch: int, cross_len: int = 0,
                 max_prefix: int = 0):
        self.lm, self.mimi, self.spec, self.batch = lm, mimi, spec, batch
        n_q = min(settings.n_q or lm.cfg.dep_q, lm.cfg.dep_q)
        self.settings = replace(settings, n_q=n_q)
        self.state = init_tts_state(lm, spec, self.settings, batch, cross_len, max_prefix, slot_streams=True)
        self.dec = mimi.init_decode_state(batch)
        self.device = self.state.gen.streams.cache.device
        self.buckets = buckets(batch)
        self.complete = [False] * batch  # the slot's whole text is in
        self.said = [0] * batch  # words of the slot's transcript reported
        self.done = [False] * batch  # the slot's stream has ended

    def capture(self) -> None:
        """Nothing to capture: TTS steps run eagerly."""

    def fit(self, used: int) -> int:
        return next(n for n in self.buckets if n >= used)

    def mask(self, *slots: int) -> torch.Tensor:
        m = torch.zeros(self.batch, dtype=torch.bool)
        m[list(slots)] = True
        return m

    def reset(self, mask: torch.Tensor | None = None) -> None:
        slots = range(self.batch) if mask is None else mask.nonzero()[:, 0].tolist()
        m = self.mask(*slots).to(self.device)
        self.state.gen.reset(m)
        self.dec.reset(m)
        for b in slots:
            self.state.scripts[b], self.complete[b], self.said[b], self.done[b] = None, False, 0, False

    def move(self, src: int, dst: int) -> None:
        move_slot(self.state, src, dst)
        self.dec.move(src, dst)
        for name in ("complete", "said", "done"):
            values = getattr(self, name)
            values[dst] = values[src]

    def start(self, slot: int, command: Speak) -> None:
        """A new stream in `slot` (between steps)."""
        start_slot(self.lm, self.spec, self.state, slot, [], command.values, command.prefix)
        mask = self.mask(slot).to(self.device)
        self.dec.reset(mask)
        G.set_sampling(self.state.gen, command.sampling or self.settings.sampling(), mask)
        G.set_seeds(self.state.gen, *command.seeds, mask)
        self.complete[slot], self.said[slot], self.done[slot] = False, 0, False

    def ready(self, slot: int) -> bool:
        return not self.done[slot] and ready(self.state, slot, self.complete[slot])

    def view(self, n: int) -> TTSState:
        """The state of slots [0, n): tensors as views, host lists as copies (`write_back`)."""
        s = self.state
        gen = s.gen.view(0, n)
        return replace(s, gen=gen, steps=s.steps[:n], scripts=s.scripts[:n], prefix_lens=s.prefix_lens[:n],
                       prefix_codes=s.prefix_codes[:n], prefix_len=s.prefix_len[:n],
                       masked_until=s.masked_until[:n], logged=s.logged[:n])

    def write_back(self, view: TTSState, n: int) -> None:
        self.state.steps[:n] = view.steps
        self.state.gen.calls = view.gen.calls

    def decode(self, n: int, codes: torch.Tensor, audio: list[bool], keep: list[bool]) -> np.ndarray:
        """Mimi on slots [0, n): codes [n, Q] -> pcm [n, F] (float32, on the host). `audio`: the
        slots whose frame is real audio; `keep`: slots without audio this tick whose decoder is
        mid-stream (saved and restored); the other slots are reset after."""
        saved = {b: self.dec.save_slot(b) for b in range(n) if keep[b]}
        dec = self.dec.view(0, n)
        pcm = self.mimi.decode_step(codes.clamp(min=0)[:, :, None].to(self.device), dec)[:, 0]  # [n, F]
        for b, snap in saved.items():
            self.dec.load_slot(b, snap)
        fresh = torch.tensor([not a and not k for a, k in zip(audio, keep)], device=self.device)
        if fresh.any():
            dec.reset(fresh)
        return pcm.clamp(-0.99, 0.99).to("cpu", torch.float32).numpy()  # as moshi-server's TTS


# ----------------------------------------------------------------------------- the loop


class TTSLoop(ModelLoop):
    """`ModelLoop` with TTS commands and ticks (see the module doc); its clock never waits for real
    time: a tick runs whenever a row can step."""

    def __init__(self, make_engine, batch: int, sink, tokenizer: Any, cfg, metrics=None):
        super().__init__(make_engine, batch, sink, tokenizer, cfg, metrics, clock="stream")

    def _apply(self, command) -> None:
        if isinstance(command, Leave):
            return super()._apply(command)
        row = self._row_of(command.seat)
        if isinstance(command, Words):
            if row is not None and not self.engine.done[row]:
                self.engine.state.scripts[row].entries.extend(command.entries)
                self.engine.complete[row] |= command.complete
            return
        if not isinstance(command, Speak):
            raise TypeError(f"a TTS model loop takes Speak, Words and Leave, got {type(command).__name__}")
        if row is None:
            row = self.rows.index(None)
        self.rows[row] = _Row(command.seat, command)
        self.engine.start(row, command)
        self._events.append(Ready(command.seat))

    def _plan(self):
        if any(r is not None and self.engine.ready(i) for i, r in enumerate(self.rows)):
            return None
        self._sleep(1.0)  # until words or a command come
        return WAIT

    def _tick_rows(self, start: int, n: int, rows: list[int]) -> None:
        e, spec = self.engine, self.engine.spec
        active = [self.rows[i] is not None and e.ready(i) for i in range(n)]
        self.metrics.observe_batch(sum(active))
        view = e.view(n)
        out = tts_step(e.lm, spec, view, active)
        e.write_back(view, n)
        steps, max_delay = e.state.steps, e.lm.cfg.max_delay
        # The frame of step s is audio from `delay_steps` on; an audio prefix's frames are not sent.
        audio = [active[b] and steps[b] - 1 - max_delay >= spec.delay_steps for b in range(n)]
        # A row that sits this tick out mid-stream keeps its decoder; the others' (not started, done) reset.
        keep = [not active[b] and not e.done[b] and steps[b] - 1 - max_delay >= spec.delay_steps for b in range(n)]
        pcm = e.decode(n, out.frame[:, 1:], audio, keep) if any(audio) else None
        for b in range(n):
            r = self.rows[b]
            if r is None or not active[b]:
                continue
            r.steps += 1
            frame_index = steps[b] - 1 - max_delay - spec.delay_steps
            if self.recorder is not None and steps[b] - 1 >= max_delay:
                self.recorder(r.seat, None, int(out.frame[b, 0]), out.frame[b, 1:].cpu().numpy(), audio[b])
            if audio[b] and frame_index >= e.state.prefix_lens[b]:
                self._events.append(Frame(r.seat, pcm[b].copy(), None))
            script = e.state.scripts[b]
            if out.popped[b] or script.end_step == steps[b] - 1:  # a word's end is known only then
                self._words(b, r.seat)
            if finished(spec, e.state, b):
                e.done[b] = True
                self._events.append(Finished(r.seat))

    def _words(self, slot: int, seat: Seat) -> None:
        """Said events for the slot's words whose end has become known."""
        e = self.engine
        words = word_timings(e.state.scripts[slot], offset=e.state.prefix_lens[slot])
        while e.said[slot] < len(words) and words[e.said[slot]][2] is not None:
            text, start, stop = words[e.said[slot]]
            self._events.append(Said(seat, text, start, stop))
            e.said[slot] += 1
