"""Kyutai TTS voices: speaker embeddings from `kyutai/tts-voices` (or a local folder or file), and
audio prefixes for the models conditioned on one (`kyutai/tts-0.75b-en-public`).

    path = resolve_tts_voice("expresso/ex03-ex01_happy_001_channel1_334s.wav", config)
    embedding = load_speaker_embedding(path)          # [512, T] for the cross-attention models
    codes = audio_prefix(path, mimi)                   # [n_q, P] for the audio-prefix models

A voice repository holds, for each voice recording `NAME` (e.g. `expresso/ex03-...-334s.wav`), the
embedding the speaker encoder of one TTS checkpoint made of it: `NAME.{sig}@{epoch}.safetensors`,
`sig` and `epoch` being the checkpoint's `model_id` in its config.json, with one tensor
`speaker_wavs` [1, 512, T]. A model conditioned on an audio prefix takes the recording itself
(`NAME`, no suffix). A voice is given as that name (looked up in `--voice-repo`: a Hugging Face
repo id or a local folder), as a local file (`path`, `file://path`), or as `hf://OWNER/REPO/FILE`.
Every problem is a `VoiceError` naming the voice and what to do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openmoshi.audio import AudioError, load_audio
from openmoshi.loading.voices import VoiceError

DEFAULT_VOICE_REPO = "kyutai/tts-voices"
SPEAKER_KEY = "speaker_wavs"
PREFIX_TRIM = 2  # frames dropped at the end of an encoded prefix, as the official get_prefix


def voice_suffix(config) -> str:
    """`.{sig}@{epoch}.safetensors` for a speaker-embedding model (from config.json's `model_id`),
    '' for an audio-prefix model."""
    if not any(c.name == SPEAKER_KEY for c in config.lm.conditioners or ()):
        return ""
    model_id = config.model_id or {}
    if "sig" not in model_id or "epoch" not in model_id:
        raise VoiceError("this TTS model's config.json has no model_id {sig, epoch}: its voice files "
                         "cannot be named; give a voice as a .safetensors file")
    return f".{model_id['sig']}@{model_id['epoch']}.safetensors"


def resolve_tts_voice(voice: str, config, voice_repo: str | None = DEFAULT_VOICE_REPO) -> Path:
    """The local file of `voice` (see the module doc), downloading it if needed."""
    if not isinstance(voice, str) or not voice:
        raise VoiceError(f"a voice must be a non-empty name or file, got {voice!r}")
    suffix = voice_suffix(config)
    if voice.startswith("hf://"):
        parts = voice[len("hf://"):].split("/")
        if len(parts) < 3 or not all(parts):
            raise VoiceError(f"voice {voice}: expected hf://OWNER/REPO/FILE")
        return _download("/".join(parts[:2]), "/".join(parts[2:]), voice)
    local = Path(voice[len("file://"):] if voice.startswith("file://") else voice).expanduser()
    if voice.startswith("file://") or local.is_file():  # a local file wins over a name in the repo
        if not local.is_file():
            raise VoiceError(f"voice file {local} does not exist")
        return local
    name = voice + suffix
    if voice_repo is None:
        raise VoiceError(f"voice {voice!r} is not a file and there is no voice repository to look it up in")
    folder = Path(voice_repo).expanduser()
    if folder.is_dir():
        path = folder / name
        if not path.is_file():
            raise VoiceError(f"voice {voice!r} not found: no {name} in {folder} (voices of this model end "
                             f"in {suffix or 'their audio extension'})")
        return path
    return _download(voice_repo, name, voice)


def _download(repo: str, name: str, voice: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo, name))
    except EntryNotFoundError:
        raise VoiceError(f"voice {voice!r} not found: {repo} has no file {name}") from None
    except RepositoryNotFoundError:
        raise VoiceError(f"voice repository {repo} not found (pass --voice-repo REPO or a local folder)") from None
    except LocalEntryNotFoundError:
        raise VoiceError(f"cannot get voice {name} from {repo}: the Hugging Face Hub cannot be reached and it "
                         "is not in the local cache; pass a local file or --voice-repo FOLDER") from None
    except (OSError, ValueError) as e:
        raise VoiceError(f"cannot get voice {name} from {repo}: {e}") from None


def load_speaker_embedding(path: str | Path, dim: int = 512) -> torch.Tensor:
    """A voice file's speaker embedding: `speaker_wavs` [1, dim, T] -> [dim, T] float32."""
    from openmoshi.loading.files import CheckpointError, read_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise VoiceError(f"voice {path}: this model takes speaker embeddings (a .safetensors voice file "
                         f"from kyutai/tts-voices), not {path.suffix or 'a file without extension'}")
    try:
        tensors = read_safetensors(path)
    except CheckpointError as e:
        raise VoiceError(f"voice {path}: {e}") from None
    if SPEAKER_KEY not in tensors:
        raise VoiceError(f"voice {path} has no {SPEAKER_KEY!r} tensor (it has {sorted(tensors)[:5]}): "
                         "not a TTS voice file")
    emb = tensors[SPEAKER_KEY]
    if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[1] != dim or emb.shape[2] < 1:
        raise VoiceError(f"voice {path}: {SPEAKER_KEY} has shape {list(emb.shape)}, expected [1, {dim}, T]")
    if not emb.dtype.is_floating_point or not bool(torch.isfinite(emb).all()):
        raise VoiceError(f"voice {path}: {SPEAKER_KEY} must be finite floats")
    return emb[0].float()


@torch.no_grad()
def audio_prefix(path: str | Path, mimi, max_seconds: float = 30.0) -> torch.Tensor:
    """An audio-prefix voice: the recording encoded by Mimi, codes [K, P] (K: Mimi's codebooks),
    the last PREFIX_TRIM frames dropped (as the official `TTSModel.get_prefix`)."""
    try:
        pcm = load_audio(path, mimi.sample_rate)  # [1, N]
    except AudioError as e:
        raise VoiceError(f"voice {path}: {e}") from None
    if pcm.shape[-1] > max_seconds * mimi.sample_rate:
        raise VoiceError(f"voice {path} lasts {pcm.shape[-1] / mimi.sample_rate:.1f} s; an audio prefix may "
                         f"last at most {max_seconds:.0f} s")
    device = next(mimi.parameters()).device
    codes = mimi.encode(pcm[None].to(device))[0]  # [K, T]
    if codes.shape[-1] <= PREFIX_TRIM:
        raise VoiceError(f"voice {path} is too short for an audio prefix (needs more than "
                         f"{PREFIX_TRIM / mimi.frame_rate:.2f} s)")
    return codes[:, :-PREFIX_TRIM]
