"""CPU speed paths chosen by measuring them on the machine they run on (`--mimi-fast auto`).

Whether the CPU fast path of Mimi (`accel.mimi_cpu`) beats the float32 reference depends on the CPU:
2.7x faster on one machine, 1.5x slower on another (AVX-512 and AMX, where MKL's own GEMM wins). So
no default is tuned to one CPU: at start, each candidate runs a few streaming frames (encode and
decode, batch 1, alternating so that other load hits all alike), a candidate whose codes differ
from the reference's is dropped, and the fastest is kept. The choice is cached per machine (CPU
model and instruction-set flags, cores, torch threads and version) and per Mimi (config and a
digest of its weights), so the next start is instant.

    choice = choose_mimi_fast(mimi)          # Choice(modes=("fp32", "fp32") or None, times_ms, cached)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from openmoshi.accel.mimi_cpu import fast_cpu

log = logging.getLogger("openmoshi.engine")

FRAME = 1920
WARMUP, FRAMES = 2, 6
# The candidates `auto` weighs: the same results only (the reference, and the fast path with the
# reference's float32 weights). Lower-precision weights change the audio: chosen by name, never by auto.
CANDIDATES: dict[str, tuple[str, str] | None] = {"off": None, "fp32,fp32": ("fp32", "fp32")}
CACHE_ENV = "OPENMOSHI_CACHE"  # a folder for the cache (default ~/.cache/openmoshi)


@dataclass(frozen=True)
class Choice:
    modes: tuple[str, str] | None  # `fast_cpu`'s (encode, decode) modes, None: the reference
    times_ms: dict[str, float]  # candidate -> median ms per frame (encode + decode) when measured
    cached: bool = False

    @property
    def name(self) -> str:
        return "off" if self.modes is None else ",".join(self.modes)

    def describe(self) -> str:
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in self.times_ms.items())
        return f"mimi fast path {self.name} ({'cached' if self.cached else 'measured'}: {times} per frame)"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "openmoshi")
    return Path(root) / "autotune.json"


def machine_key() -> str:
    """What a CPU speed depends on: the CPU (its name and instruction-set flags), cores, threads, torch."""
    name, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
    return f"{name}|flags {digest}|cores {os.cpu_count()}|threads {torch.get_num_threads()}|torch {torch.__version__}"


def mimi_key(mimi) -> str:
    """The Mimi's config and a digest of its weights (a few values of every tensor, cheap)."""
    h = hashlib.sha1(repr(mimi.cfg).encode() + str(mimi.num_codebooks).encode())
    for name, t in mimi.state_dict().items():
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def measure(models: dict[str, object], frames: int = FRAMES, warmup: int = WARMUP,
            seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median ms per streaming frame (encode + decode, batch 1) and the codes of each model, on the
    same audio, one frame of each in turn."""
    g = torch.Generator().manual_seed(seed)
    pcm = 0.1 * torch.randn(warmup + frames, 1, 1, FRAME, generator=g)
    states = {k: (m.init_encode_state(1), m.init_decode_state(1)) for k, m in models.items()}
    times = {k: [] for k in models}
    codes = {k: [] for k in models}
    for i in range(warmup + frames):
        for k, m in models.items():
            enc, dec = states[k]
            start = time.perf_counter()
            c = m.encode_step(pcm[i], enc)
            m.decode_step(c, dec)
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
            codes[k].append(c)
    return ({k: 1000 * statistics.median(v) for k, v in times.items()},
            {k: torch.cat(v, dim=-1) for k, v in codes.items()})


def choose_mimi_fast(mimi, candidates: dict[str, tuple[str, str] | None] | None = None,
                     make: Callable = fast_cpu, cache: Path | None = None) -> Choice:
    """The fastest candidate on this machine whose codes equal the reference's (see the module
    doc); `make(mimi, *modes)` builds a candidate. Cached in `cache` (default `cache_path()`)."""
    candidates = dict(CANDIDATES if candidates is None else candidates)
    cache = cache_path() if cache is None else cache
    key = f"{machine_key()}|mimi {mimi_key(mimi)}|{sorted(candidates)}"
    known = _read(cache)
    if key in known and known[key]["mode"] in candidates:
        entry = known[key]
        return Choice(candidates[entry["mode"]], entry["times_ms"], cached=True)
    models = {name: mimi if modes is None else make(mimi, *modes) for name, modes in candidates.items()}
    times, codes = measure(models)
    reference = codes[next(n for n, m in candidates.items() if m is None)]
    same = [n for n in candidates if torch.equal(codes[n], reference)]
    for name in candidates:
        if name not in same:
            log.warning("autotune_rejected", extra={"fields": {"candidate": name, "why": "its codes differ"}})
    best = min(same, key=times.__getitem__)
    choice = Choice(candidates[best], {k: round(v, 2) for k, v in times.items()})
    known[key] = {"mode": best, "times_ms": choice.times_ms}
    _write(cache, known)
    return choice


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the next start measures again
        log.warning("autotune_cache_unwritable", extra={"fields": {"path": str(path), "error": str(e)}})
