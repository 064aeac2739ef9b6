"""The streaming engine: a model's states for `batch` slots, and the three per-frame steps over them.

    engine = Engine.build(model, batch=8, speed=speed)       # states allocated; graphs captured on demand
    codes = engine.encode(pcm)            # pcm [n, 1, 1920] -> codes [n, K, 1]   (slots [0, n))
    out = engine.step(codes[:, :, 0], active, position)      # StepOutput: text [n], audio [n, Q], valid [n]
    pcm = engine.decode(out.audio[:, :, None])               # [n, 1, 1920]

Each call runs on the first n slots, n a bucket size (1, 2, 4, ..., batch): the states' prefixes are
views, so a call costs what n slots need and the slots beyond cost nothing. `start=a` runs on slots
[a, a + n) instead (any n: a server's phase group of rows), eagerly: graphs are captured for the
prefixes only. With `speed.cuda_graphs`
each bucket's steps are captured (`accel.cuda_graph`: one LM-step graph per attention window and
sampler flags); outputs are then the graphs' own buffers, valid until the same step's next call.

The engine also owns what the slots need besides tokens: the condition of a conditioned model (Hibiki's
"very_good", with "very_bad" as the negative of classifier-free guidance), each slot's sampling
settings and seeds, the memory all this takes (known before allocating: `Engine.state_bytes`), and the
slot operations the server's model loop uses between frames (reset, move, snapshots).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from openmoshi.accel.cuda_graph import GraphedStep, graphed
from openmoshi.engine.speed import Speed
from openmoshi.errors import UserError
from openmoshi.lm import generate as G
from openmoshi.lm.conditioners import HIBIKI_CONDITION, HIBIKI_NEGATIVE
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.budget import MemoryCheckError
from openmoshi.memory import available_bytes, gb

log = logging.getLogger("openmoshi.engine")

SPANS = 64  # eager steps of slot spans kept (a server's phase groups reuse a few)


def buckets(batch: int) -> list[int]:
    """Slot counts a step runs at: powers of two, and `batch` itself."""
    sizes, n = [], 1
    while n < batch:
        sizes.append(n)
        n *= 2
    return sizes + [batch]


def conditions(lm, model_type: str, cfg_coef: float = 1.0) -> tuple[dict | None, dict | None]:
    """(condition, negative) of a model, as the official tools choose them: Hibiki's description
    ("very_good", and "very_bad" to steer away from under classifier-free guidance); none for an
    unconditioned model. UserError for what cannot run."""
    if lm.condition_provider is None:
        if cfg_coef != 1.0:
            raise UserError("classifier-free guidance (--cfg-coef) needs a conditioned model such as Hibiki; "
                            "use --cfg-coef 1")
        return None, None
    if model_type != "hibiki":
        raise UserError(f"this {model_type} model expects conditioning, which is supported for Hibiki only")
    return HIBIKI_CONDITION, (HIBIKI_NEGATIVE if cfg_coef != 1.0 else None)


@dataclass
class _Bucket:
    """The steps over the states' first `size` slots (views), graphed when the speed says so."""

    size: int
    gen: G.GenState
    enc: Any
    dec: Any
    encode: Callable
    decode: Callable
    lm_step: GraphedStep | None
    encode_some: Callable | None = None  # encode(pcm, active): slots not active keep their state


class Engine:
    """States of `batch` slots of one model and the steps over prefixes of them; see the module doc.
    `all_buckets=False`: the whole batch only (offline inference runs every slot at every step);
    `slot_streams=False`: one random stream, `generator`, for the batch (the official sampler's, for
    parity) rather than a seeded stream per slot."""

    def __init__(self, lm, mimi, batch: int, speed: Speed, sampling: SamplingConfig = SamplingConfig(),
                 condition: dict | None = None, negative: dict | None = None, cfg_coef: float = 1.0,
                 slot_streams: bool = True, generator: torch.Generator | None = None, max_k: int | None = None,
                 max_k_text: int | None = None, all_buckets: bool = True):
        if batch < 1:
            raise UserError(f"batch must be >= 1, got {batch}")
        if lm is not None:
            check_conditions(lm, mimi, condition, negative, cfg_coef)
        self.lm, self.mimi, self.batch, self.speed = lm, mimi, batch, speed
        self.cfg_coef, self.generator = cfg_coef, generator
        self.device = next((lm or mimi).parameters()).device
        self.gen = None  # no LM: a codec-only engine (`bench --codec-only`)
        if lm is not None:
            self.gen = G.init_state(lm, batch, sampling, max_k=max_k, max_k_text=max_k_text, cfg_coef=cfg_coef,
                                    slot_streams=slot_streams)
        if condition is not None:  # every slot, once: resetting a slot keeps its condition
            neg = lm.condition_sum([negative] * batch) if negative is not None else None
            G.set_condition(self.gen, lm.condition_sum([condition] * batch), negative=neg)
        self.enc = mimi.init_encode_state(batch) if mimi is not None else None
        self.dec = mimi.init_decode_state(batch) if mimi is not None and (lm is None or lm.cfg.gen_q) else None
        self.mimi_dtype = next(mimi.parameters()).dtype if mimi is not None else None
        self.buckets = {n: self._bucket(n) for n in (buckets(batch) if all_buckets else [batch])}
        self._spans: dict[tuple[int, int], _Bucket] = {}  # (start, n) -> the eager steps of slots [start, start + n)

    @classmethod
    def build(cls, model, batch: int, speed: Speed, sampling: SamplingConfig | None = None, cfg_coef: float = 1.0,
              **kwargs) -> "Engine":
        """The engine of a loaded model (`loading.model.LoadedModel`, fast paths applied by
        `speed.prepare`), its condition chosen from its type."""
        condition, negative = conditions(model.lm, model.config.model_type, cfg_coef)
        sampling = sampling or SamplingConfig.from_gen_config(model.config.lm_gen_config)
        return cls(model.lm, model.mimi, batch, speed, sampling, condition, negative, cfg_coef, **kwargs)

    # ------------------------------------------------------------------ the steps

    def _bucket(self, n: int, start: int = 0) -> _Bucket:
        gen, enc, dec = (None if state is None else state.view(start, start + n)
                         for state in (self.gen, self.enc, self.dec))
        mimi, graphs, device = self.mimi, self.speed.cuda_graphs and start == 0, self.device
        encode = decode = encode_some = None
        if enc is not None:
            encode = graphed(lambda pcm: mimi.encode_step(pcm, enc), graphs, device, name=f"mimi_encode_{n}")
            encode_some = graphed(lambda pcm, active: mimi.encode_step(pcm, enc, active), graphs, device,
                                  name=f"mimi_encode_some_{n}")
        if dec is not None:
            decode = graphed(lambda codes: mimi.decode_step(codes, dec), graphs, device, name=f"mimi_decode_{n}")
        lm_step = GraphedStep(self.lm, gen, graphs, self.generator) if gen is not None else None
        return _Bucket(n, gen, enc, dec, encode, decode, lm_step, encode_some)

    def bucket(self, n: int, start: int = 0) -> _Bucket:
        """The bucket of the first n slots when n is a bucket size, else the span of slots
        [start, start + n) (eager; made once and kept, the latest SPANS of them)."""
        if start == 0 and n in self.buckets:
            return self.buckets[n]
        if not 0 <= start < start + n <= self.batch:
            raise ValueError(f"slots [{start}, {start + n}) are not within this engine's {self.batch}")
        span = self._spans.pop((start, n), None) or self._bucket(n, start)
        self._spans[(start, n)] = span  # the most recent last
        while len(self._spans) > SPANS:
            self._spans.pop(next(iter(self._spans)))
        return span

    def fit(self, used: int) -> int:
        """The smallest bucket holding slots [0, used)."""
        return next(n for n in self.buckets if n >= used)

    def encode(self, pcm: torch.Tensor, start: int = 0, hold: torch.Tensor | None = None) -> torch.Tensor:
        """pcm [n, 1, F] (any device and float dtype) -> codes [n, K, 1] of slots [start, start + n).
        `hold` [n] bool: slots whose encoder must not move (a stream with no frame this tick, see the
        model loop's stream clock): their codes are garbage and their states untouched."""
        b, pcm = self.bucket(pcm.shape[0], start), pcm.to(self.device, self.mimi_dtype)
        if hold is None:
            return b.encode(pcm)
        return b.encode_some(pcm, ~hold.to(self.device))

    def step(self, codes: torch.Tensor, active: torch.Tensor | None = None, position: int | None = None,
             forced: torch.Tensor | None = None, embeddings=None, start: int = 0) -> G.StepOutput:
        """One LM step of slots [start, start + n): codes [n, Ku]; see `accel.cuda_graph.GraphedStep`."""
        b = self.bucket(codes.shape[0], start)
        forcing = {} if forced is None and embeddings is None else dict(forced=forced, embeddings=embeddings)
        return b.lm_step(codes, active, position, **forcing)

    def decode(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes [n, Q, 1] -> pcm [n, 1, F] of slots [start, start + n)."""
        return self.bucket(codes.shape[0], start).decode(codes)

    def capture(self) -> None:
        """Every graph of the default sampling settings, before the first conversation (a capture
        takes far longer than a step), with every slot idle; the states are reset after."""
        b = self.buckets[self.batch]
        if b.lm_step is None or not b.lm_step.enabled:
            return  # eager (on a CPU with cuda_graphs: the static-buffer discipline, captured all the same)
        start, graphs = time.monotonic(), 0
        F, K = self.mimi.frame_size, self.mimi.num_codebooks
        streams = self.lm.cfg.gen_q == 0  # speech to text: its streams sit ticks out (`encode(hold=...)`)
        for n, b in self.buckets.items():
            idle = torch.zeros(n, dtype=torch.bool, device=self.device)
            for _ in range(b.encode.warmup + 1):  # warm-up calls, then capture and replay
                silence = torch.zeros(n, 1, F, device=self.device, dtype=self.mimi_dtype)
                codes = b.encode(silence)
                if streams:
                    b.encode_some(silence, idle)
                if b.decode is not None:
                    b.decode(torch.zeros(n, K, 1, dtype=torch.long, device=self.device))
            graphs += b.lm_step.capture_all(codes[:, :, 0], idle) + 2
        self.reset()
        log.info("cuda_graphs_ready", extra={"fields": {"buckets": list(self.buckets), "graphs": graphs,
                                                        "seconds": round(time.monotonic() - start, 2)}})

    # ------------------------------------------------------------------ slots

    def mask(self, *slots: int) -> torch.Tensor:
        m = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        m[list(slots)] = True
        return m

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """New conversations in the masked slots (all when None): LM streams, Mimi states; their
        sampling settings, seeds and condition stay."""
        mask = None if mask is None else mask.to(self.device)
        for state in (self.gen, self.enc, self.dec):
            if state is not None:
                state.reset(mask)

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` continues slot `src`'s conversation (LM and Mimi states, settings, seeds)."""
        for state in (self.gen, self.enc, self.dec):
            if state is not None:
                state.move(src, dst)

    def configure(self, slot: int, sampling: SamplingConfig, seeds: tuple[int, int] | None = None) -> None:
        """A slot's sampling settings, and its seeds (which also rewind its random streams)."""
        mask = self.mask(slot)
        G.set_sampling(self.gen, sampling, mask)
        if seeds is not None:
            G.set_seeds(self.gen, *seeds, mask)

    @staticmethod
    def state_bytes(lm, batch: int, cfg_coef: float = 1.0) -> int:
        return G.state_bytes(lm, batch, cfg_coef)


def check_conditions(lm, mimi, condition: dict | None, negative: dict | None, cfg_coef: float) -> None:
    """UserError unless the condition, guidance and Mimi fit the model."""
    if (lm.condition_provider is not None) != (condition is not None):
        raise UserError("a conditioned model needs condition attributes (e.g. Hibiki's "
                        "{'description': 'very_good'}) and an unconditioned one takes none")
    if (cfg_coef != 1.0) != (negative is not None) or (negative is not None and condition is None):
        raise UserError("classifier-free guidance (cfg_coef != 1) needs a conditioned model and a negative "
                        "condition (e.g. Hibiki's {'description': 'very_bad'}); use cfg_coef=1")
    if mimi is not None and mimi.num_codebooks < lm.cfg.num_user_codebooks:
        raise UserError(f"Mimi produces {mimi.num_codebooks} codebooks, the LM reads {lm.cfg.num_user_codebooks}")


def check_memory(lm, batch: int, cfg_coef: float = 1.0) -> None:
    """The states of every slot (mostly the KV cache at full context) are allocated at once:
    refuse, with the numbers, when they cannot fit in the device's free memory."""
    device = next(lm.parameters()).device
    need = G.state_bytes(lm, batch, cfg_coef)
    free = available_bytes(device)
    if free is None or need <= 0.9 * free:
        return
    per = G.state_bytes(lm, 1, cfg_coef)
    fit = int(0.9 * free // per)
    raise MemoryCheckError(f"--max-sessions {batch} needs {gb(need)} for the conversations' states "
                           f"({gb(per)} each, mostly the KV cache at the full {lm.cfg.context}-frame "
                           f"context), but {device} has {gb(free)} free: use --max-sessions {fit} or fewer"
                           + ("" if fit else ", or a smaller dtype or model"))
