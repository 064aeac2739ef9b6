"""Test helpers around the official `moshi` package (the behavioural oracle) and real speech.

- `make_official_mimi(seed)`: the official Mimi with random weights AND random codebooks. A fresh
  official Mimi has all-zero codebooks and encodes everything to code 0, which would make any
  parity test pass trivially (see the reference README, "A trap when making random checkpoints").
- `to_released_naming(sd)`: the official `state_dict()` names attention weights
  `in_projs.0.weight` / `out_projs.0.weight`; the released checkpoint file uses
  `in_proj_weight` / `out_proj.weight` (openmoshi's `checkpoint.canonical_keys` reads both).
- `save_official_mimi(path, seed)`: writes such a random checkpoint as safetensors.
- `speech(seconds)`: real speech (espeak-ng), float32 mono at 24 kHz.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import wave

import numpy as np
import torch

SAMPLE_RATE = 24000
SPEECH_TEXT = (
    "The quick brown fox jumps over the lazy dog. Streaming audio codecs turn speech into "
    "discrete tokens, twelve and a half frames every second, so that a language model can listen "
    "and talk at the same time. Peter Piper picked a peck of pickled peppers. How many seconds "
    "of audio do we need before the test becomes convincing? Probably not very many at all."
)


def make_official_mimi(seed: int, n_q: int = 32, config: dict | None = None):
    """Official Mimi with random weights and random codebooks, in the released layout unless
    `config` (an official mimi config dict) says otherwise.

    Uses its own RNG state, so it does not disturb the caller's random stream."""
    from moshi.models import loaders

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, config, device="cpu", num_codebooks=n_q)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in mimi.named_parameters():
                # Conv and linear weights already have a random init; the constant ones do not.
                if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                    p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=gen))
                elif ".norm" in name and name.endswith(".weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
                elif ".norm" in name and name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        _random_codebooks(mimi, gen)
    mimi.set_num_codebooks(n_q)
    mimi.eval()
    return mimi


def _random_codebooks(mimi, gen: torch.Generator) -> None:
    """Fill every codebook with Gaussian centroids matched to the statistics of its input.

    With random weights the latents barely move over time around a large constant offset, so
    centroids drawn around zero would all lose to the same one. Instead, level by level, run the
    real speech through the model and draw the centroids from N(mean, std^2) of the residual that
    level sees (per dimension), the way k-means-style inits start from data."""
    latent = mimi._encode_to_unquantized_latent(speech(2.0)[None, None])  # [1, D, T]
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        residual = rvq.input_proj(latent)  # [1, d, T]
        for level in rvq.vq.layers:
            book = level._codebook
            bins, dim = book.embedding_sum.shape
            vectors = residual[0].T  # [T, d]
            mean, std = vectors.mean(0), vectors.std(0)
            centroids = mean + std * torch.randn(bins, dim, generator=gen)
            usage = 0.2 + 2.0 * torch.rand(bins, generator=gen)
            book.embedding_sum.copy_(centroids * usage[:, None])
            book.cluster_usage.copy_(usage)
            book._initialized.fill_(1.0)
            book.register_buffer("_embedding", None, persistent=False)  # drop the cached centroids
            residual = residual - level.decode(level.encode(residual))


def to_released_naming(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `...self_attn.in_projs.0.weight` -> `...self_attn.in_proj_weight` and
    `...self_attn.out_projs.0.weight` -> `...self_attn.out_proj.weight`."""
    out = {}
    for key, value in sd.items():
        key = key.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        key = key.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        out[key] = value
    return out


def save_official_mimi(path, seed: int, released_naming: bool = False, n_q: int = 32) -> None:
    """Write the random official Mimi's state dict as safetensors, keys as `state_dict()` names
    them, or as in the released checkpoint file when `released_naming`."""
    from safetensors.torch import save_file

    sd = make_official_mimi(seed, n_q).state_dict()
    if released_naming:
        sd = to_released_naming(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def load_into_openmoshi(official_mimi, num_codebooks: int | None = None,
                        config: dict | None = None):
    """An openmoshi `Mimi` holding the official model's weights, loaded strictly."""
    from openmoshi.mimi.codec import Mimi
    from openmoshi.mimi.config import mimi_config_from_dict

    cfg = None if config is None else mimi_config_from_dict(config)
    mimi = Mimi(cfg, num_codebooks=num_codebooks or official_mimi.num_codebooks)
    from openmoshi.loading.files import canonical_keys

    mimi.load_state_dict(canonical_keys(dict(official_mimi.state_dict())), strict=True)
    return mimi.eval()


# ----------------------------------------------------------------------------- speech


def _read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as f:
        assert f.getsampwidth() == 2 and f.getnchannels() == 1, path
        data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)
    return data.astype(np.float32) / 32768.0


def _espeak_wav() -> str | None:
    """Path of the cached 24 kHz speech wav, made with espeak-ng + sox; None if they are missing."""
    cache = os.path.join(tempfile.gettempdir(), "openmoshi_test_audio")
    out = os.path.join(cache, "speech_24k.wav")
    if os.path.exists(out):
        return out
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        return None
    os.makedirs(cache, exist_ok=True)
    raw = os.path.join(cache, f"raw_{os.getpid()}.wav")
    tmp = os.path.join(cache, f"speech_{os.getpid()}.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", raw, SPEECH_TEXT], check=True,
                   capture_output=True)
    subprocess.run(["sox", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", tmp], check=True,
                   capture_output=True)
    os.replace(tmp, out)  # atomic: parallel test runs never read a half-written file
    os.remove(raw)
    return out


def _synthetic(n: int) -> np.ndarray:
    """Fallback: a voiced-like harmonic signal with a wandering pitch and syllable envelope."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 30 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(f0) / SAMPLE_RATE
    sig = sum(np.sin(h * phase) / h for h in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * math.pi * 3.0 * t) ** 2
    return (0.1 * env * sig).astype(np.float32)


def speech(seconds: float) -> torch.Tensor:
    """`seconds` of real speech as float32 [N] at 24 kHz (espeak-ng; synthetic if unavailable)."""
    n = int(round(seconds * SAMPLE_RATE))
    path = _espeak_wav()
    audio = _read_wav(path) if path is not None else _synthetic(n)
    if len(audio) < n:
        audio = np.tile(audio, n // len(audio) + 1)
    return torch.from_numpy(audio[:n].copy())
