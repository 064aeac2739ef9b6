"""Voice prompts for PersonaPlex personas, from files or from a folder of them (`serve
--voice-prompt-dir`, PersonaPlex's `voices.tgz` unpacked).

    voices = list_voices(folder)                       # ["NATF0.pt", ..., "me.wav"]
    voice = load_voice(resolve_voice(folder, name), mimi, lm.cfg)   # codes [F, 8] or a Preset

A voice is an audio file (any format PyAV reads), normalised to -24 LUFS (ITU-R BS.1770, with
pyloudnorm, as PersonaPlex) and Mimi-encoded frame by frame from a fresh state (the last partial
frame padded with silence); or a PersonaPlex preset `.pt`, a dict of tensors `embeddings` [F - 1,
1, 1, D] and `cache` [1, K, R], read with `torch.load(weights_only=True)`. Every problem is a
`VoiceError` naming the file or the voice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openmoshi.audio import SAMPLE_RATE, AudioError, load_audio
from openmoshi.errors import UserError
from openmoshi.lm.config import LMConfig
from openmoshi.lm.persona import Preset, PromptError, check_preset

TARGET_LUFS = -24.0
PRESET_SUFFIX = ".pt"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm")


class VoiceError(UserError):
    """A voice that cannot be used; the message names it and says why."""


def list_voices(folder: str | Path) -> list[str]:
    """The voice file names in `folder` (audio files and presets), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VoiceError(f"voice prompt folder {folder} does not exist or is not a folder")
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (PRESET_SUFFIX, *AUDIO_SUFFIXES))


def resolve_voice(folder: str | Path, name: str) -> Path:
    """The file of voice `name` in `folder`: a plain file name listed by `list_voices`."""
    names = list_voices(folder)
    if name not in names:  # also refuses paths: names are file names in the folder
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise VoiceError(f"unknown voice {name!r}; the voices are: {shown or '(none)'}")
    return Path(folder) / name


def normalize_loudness(pcm: torch.Tensor, target: float = TARGET_LUFS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[1, N] float -> the same at `target` integrated loudness (LUFS)."""
    import pyloudnorm

    x = pcm[0].double().numpy()
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(x)
    if not torch.isfinite(torch.tensor(loudness)):
        raise VoiceError("the voice prompt is silent (or shorter than 0.4 s): its loudness cannot be measured")
    return torch.from_numpy(pyloudnorm.normalize.loudness(x, loudness, target)).float()[None]


def load_voice(path: str | Path, mimi, cfg: LMConfig) -> torch.Tensor | Preset:
    """Mimi codes [F, K] of an audio file, or the Preset of a `.pt` file (see the module doc)."""
    path = Path(path)
    if path.suffix.lower() == PRESET_SUFFIX:
        return load_preset(path, cfg)
    try:
        pcm = load_audio(path)
    except AudioError as e:
        raise VoiceError(f"voice prompt {path.name}: {e}") from None
    try:
        pcm = normalize_loudness(pcm)
    except VoiceError as e:
        raise VoiceError(f"voice prompt {path.name}: {e}") from None
    device = next(mimi.parameters()).device
    with torch.no_grad():
        codes = mimi.encode(pcm[None].to(device))  # [1, K, F], the last frame padded with silence
    return codes[0].T.contiguous().cpu()


def load_preset(path: str | Path, cfg: LMConfig) -> Preset:
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: not a safe tensor file
        raise VoiceError(f"voice preset {path.name} cannot be read as a tensor file: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), torch.Tensor) for k in ("embeddings", "cache")):
        raise VoiceError(f"voice preset {path.name} is not a PersonaPlex preset: expected a dict with the "
                         f"tensors 'embeddings' and 'cache'")
    emb, cache = data["embeddings"], data["cache"]
    if emb.dim() < 2 or cache.dim() != 3 or cache.shape[0] != 1 or cache.dtype.is_floating_point:
        raise VoiceError(f"voice preset {path.name}: embeddings {list(emb.shape)} and cache "
                         f"{list(cache.shape)} {cache.dtype} are not a preset's shapes")
    preset = Preset(embeddings=emb.reshape(emb.shape[0], -1).float(), cache=cache[0].long())
    try:
        check_preset(preset, cfg)
    except PromptError as e:
        raise VoiceError(f"voice preset {path.name}: {e}") from None
    return preset
