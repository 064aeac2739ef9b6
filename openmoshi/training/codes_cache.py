"""Mimi codes of every conversation, encoded once into a cache on disk and read from there after.

Each wav's two channels (model, user) are encoded with Mimi in streaming chunks (bounded memory
for long files; the same codes as encoding the whole file). Codes go into safetensors shards,
one tensor per file, int16 [2 K, T]: the model's K codebooks, then the user's. An index names,
per wav, its size and modification time (a changed file is encoded again), its number of frames
and samples, and where its codes are. Index and shards are keyed by the Mimi weights'
fingerprint and K, so another Mimi never reads stale codes. Wavs are named by their path relative to
the cache folder, so a dataset moved or copied together with its cache keeps it. Several ranks encode disjoint files in
parallel; rank 0 merges their index parts.

    cache/index-<fingerprint>-k8.json
    cache/codes-<fingerprint>-k8-<unique>.safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from openmoshi.audio import SAMPLE_RATE, AudioError, load_audio
from openmoshi.mimi.codec import FRAME_SIZE
from openmoshi.training.manifest import DataError, Entry

CHUNK_FRAMES = 125  # frames per streaming call: 10 s of audio
SHARD_BYTES = 64 << 20


@dataclass(frozen=True)
class Cached:
    size: int
    mtime_ns: int
    frames: int  # ceil(samples / FRAME_SIZE)
    samples: int  # at 24 kHz
    shard: str
    key: str

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def fingerprint(path: str | Path) -> str:
    """A short hash of a weights file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def encode_stereo(mimi, path: Path) -> tuple[torch.Tensor, int]:
    """(codes int16 [2 K, T], samples) of a stereo wav: channel 0 (the model), then channel 1."""
    try:
        pcm = load_audio(path, SAMPLE_RATE, mono=False)  # [C, N]
    except AudioError as e:
        raise DataError(str(e)) from None
    if pcm.shape[0] != 2:
        raise DataError(f"{path} has {pcm.shape[0]} channel(s); fine-tuning needs stereo wavs: channel 0 "
                        "the model (assistant), channel 1 the user")
    samples = pcm.shape[1]
    pcm = torch.nn.functional.pad(pcm, (0, -samples % FRAME_SIZE))[:, None]  # [2, 1, T * FRAME_SIZE]
    device = next(mimi.parameters()).device
    state = mimi.init_encode_state(2)
    chunk = CHUNK_FRAMES * FRAME_SIZE
    codes = [mimi.encode_step(pcm[..., i:i + chunk].to(device, torch.float32), state).cpu()
             for i in range(0, pcm.shape[-1], chunk)]
    codes = torch.cat(codes, dim=-1)  # [2, K, T]
    return codes.reshape(-1, codes.shape[-1]).to(torch.int16), samples


class CodesCache:
    """The cache of one Mimi (fingerprint, K codebooks) in `folder`."""

    def __init__(self, folder: str | Path, mimi_fingerprint: str, num_codebooks: int):
        self.folder = Path(folder)
        self.tag = f"{mimi_fingerprint}-k{num_codebooks}"
        self.index_path = self.folder / f"index-{self.tag}.json"
        self._shards: dict[str, object] = {}

    def index(self) -> dict[str, Cached]:
        if not self.index_path.exists():
            return {}
        try:
            raw = json.loads(self.index_path.read_text())
            return {k: Cached(**v) for k, v in raw.items()}
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"codes cache index {self.index_path} is damaged ({e}); delete it to encode again") from None

    def key(self, wav: Path) -> str:
        return os.path.relpath(wav, self.folder)

    def get(self, index: dict[str, Cached], wav: Path) -> Cached:
        """The entry of `wav` in `index` (from `index()`)."""
        return index[self.key(wav)]

    def stale(self, entries: list[Entry]) -> list[Entry]:
        """The entries whose codes are missing or older than their wav."""
        known = self.index()
        out = []
        for e in entries:
            c = known.get(self.key(e.path))
            if c is None or (c.size, c.mtime_ns) != _stat(e.path) or not (self.folder / c.shard).exists():
                out.append(e)
        return out

    def encode(self, entries: list[Entry], mimi, part: int = 0, log=None) -> None:
        """Encodes `entries` into new shards and writes the index part `part` (merge with `merge`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        part_index: dict[str, dict] = {}
        pending: dict[str, torch.Tensor] = {}
        pending_meta: dict[str, dict] = {}

        def flush():
            if not pending:
                return
            from safetensors.torch import save_file

            name = f"codes-{self.tag}-{uuid.uuid4().hex[:12]}.safetensors"
            tmp = self.folder / f".{name}.tmp"
            save_file(pending, str(tmp))
            os.replace(tmp, self.folder / name)
            for key, meta in pending_meta.items():
                path = meta.pop("path")
                part_index[path] = dict(meta, shard=name, key=key)
            pending.clear()
            pending_meta.clear()

        size = 0
        for i, e in enumerate(entries):
            file_size, mtime = _stat(e.path)
            codes, samples = encode_stereo(mimi, e.path)
            key = str(len(pending))
            pending[key] = codes.contiguous()
            pending_meta[key] = {"path": self.key(e.path), "size": file_size, "mtime_ns": mtime,
                                 "frames": codes.shape[-1], "samples": samples}
            size += codes.numel() * 2
            if log is not None:
                log(f"encoded {e.path.name} ({samples / SAMPLE_RATE:.1f} s), {i + 1}/{len(entries)}")
            if size >= SHARD_BYTES:
                flush()
                size = 0
        flush()
        self._write_json(self.folder / f".index-{self.tag}.part{part}.json", part_index)

    def merge(self, parts: int) -> None:
        """Folds the index parts written by `encode` into the index."""
        merged = {k: asdict(v) for k, v in self.index().items()}
        for p in range(parts):
            path = self.folder / f".index-{self.tag}.part{p}.json"
            if path.exists():
                merged.update(json.loads(path.read_text()))
                path.unlink()
        self._write_json(self.index_path, merged)

    @staticmethod
    def _write_json(path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def read(self, cached: Cached) -> torch.Tensor:
        """codes int64 [2 K, T] of one file."""
        from safetensors import safe_open

        f = self._shards.get(cached.shard)
        if f is None:
            f = self._shards[cached.shard] = safe_open(str(self.folder / cached.shard), "pt")
        return f.get_tensor(cached.key).long()
