"""Word alignments for fine-tuning data, written by a local Whisper ASR (`openmoshi annotate`).

For each wav of a manifest, channel 0 (the model's voice) is transcribed by `whisper_timestamped`
(word times from cross-attention and DTW on top of `openai-whisper`), and the words are written
beside the wav as the JSON that `manifest.read_alignments` reads:

    a.json:  {"alignments": [["hello", [0.5, 0.82], "SPEAKER_MAIN"], ...], ...other keys kept}

Times are rounded to milliseconds and kept inside the audio: Whisper works on 30 s windows and
can place words in the padding past the end, which `read_alignments` would reject. A JSON already
there is left alone unless `overwrite`, so an interrupted run picks up where it stopped. Each file
is written to a temporary name and renamed, so a JSON that exists is always a whole one.

Both ASR packages are optional (`pip install 'openmoshi[annotate]'`) and imported only here.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from openmoshi.audio import load_audio
from openmoshi.errors import UserError
from openmoshi.training.manifest import MAIN_SPEAKER, DataError, Word, alignment_path, read_manifest

DEFAULT_MODEL = "medium"
WHISPER_SAMPLE_RATE = 16000  # Whisper's input: 16 kHz mono float32
MODEL_CHANNEL = 0  # channel 0 is the model (assistant), channel 1 the user
INSTALL_HINT = "pip install 'openmoshi[annotate]'"


class ModelError(UserError):
    """A Whisper model that cannot be found, fetched or loaded; the message says what to pass."""


@dataclass(frozen=True)
class Summary:
    annotated: int  # files transcribed and written
    skipped: int  # files that had an alignment already
    words: int  # words written, all files
    seconds: float  # wall time


def _whisper():
    """The two ASR modules, or a ModelError that says how to install them."""
    try:
        import whisper
        import whisper_timestamped
    except ImportError as e:
        raise ModelError(f"openmoshi annotate needs whisper-timestamped and openai-whisper ({e}): "
                         f"{INSTALL_HINT}") from None
    return whisper, whisper_timestamped


def language_code(language: str | None) -> str | None:
    """Whisper's code for `language` ('en', 'english', 'French' ...), None for 'auto' (detect
    per file). Checked before the model loads, so a typo fails at once."""
    if language is None or language.lower() == "auto":
        return None
    _whisper()
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    key = language.lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ModelError(f"unknown language {language!r}: give a code Whisper knows (en, fr, de, ...) or 'auto'")


def load_whisper(model: str, device=None):
    """A Whisper model from an official name (`tiny` ... `large-v3`, fetched once into Whisper's
    cache, ~/.cache/whisper or $XDG_CACHE_HOME/whisper) or a local checkpoint file in Whisper's
    format, {"dims": {...}, "model_state_dict": {...}}."""
    whisper, _ = _whisper()
    names = whisper.available_models()
    if model in names:
        try:
            return whisper.load_model(model, device=device)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), bad checksum
            raise ModelError(f"cannot fetch Whisper model {model!r} ({_reason(e)}); without network, "
                             "pass a local checkpoint with --model PATH") from None
    path = Path(model)
    if not path.exists():
        looks_like_path = path.suffix or os.sep in model or (os.altsep and os.altsep in model)
        if looks_like_path:
            raise ModelError(f"Whisper checkpoint {model} does not exist")
        raise ModelError(f"unknown Whisper model {model!r}: give one of {', '.join(names)}, "
                         "or the path of a checkpoint file")
    if not path.is_file():
        raise ModelError(f"Whisper checkpoint {model} is not a file")
    try:
        return whisper.load_model(str(path), device=device)
    except Exception as e:  # torch.load's unpickling errors, a missing 'dims', mismatched shapes
        raise ModelError(f"{model} is not a Whisper checkpoint ({type(e).__name__}: {_reason(e)}); "
                         'expected torch.save({"dims": {...}, "model_state_dict": {...}})') from None


def _reason(error: Exception) -> str:
    text = str(getattr(error, "reason", None) or error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def model_channel(wav: Path):
    """Channel 0 of a stereo wav at 16 kHz, float32 [N]."""
    pcm = load_audio(wav, WHISPER_SAMPLE_RATE, mono=False)  # [C, N]
    if pcm.shape[0] != 2:
        kind = "is mono" if pcm.shape[0] == 1 else f"has {pcm.shape[0]} channels"
        raise DataError(f"{wav} {kind}; fine-tuning audio must be stereo: channel 0 the model "
                        "(assistant), channel 1 the user")
    return pcm[MODEL_CHANNEL]


def words_from_result(result: dict, duration: float) -> list[Word]:
    """The words of a `whisper_timestamped.transcribe` result, ready to write: text stripped (and
    dropped when empty), times in whole milliseconds inside [0, duration], sorted by start. A word
    that starts at or past the end of the audio is dropped: it lies in Whisper's padding."""
    limit = math.floor(duration * 1000)  # ms
    words = []
    for segment in result.get("segments", []):
        for word in segment.get("words", []):
            text = str(word.get("text", "")).strip()
            start = max(round(float(word["start"]) * 1000), 0)
            if not text or start >= limit:
                continue
            end = min(max(round(float(word["end"]) * 1000), start), limit)
            words.append(Word(text, start / 1000, end / 1000))
    words.sort(key=lambda w: (w.start, w.end))
    return words


def transcribe(model, audio, language: str | None, source: Path | None = None) -> list[Word]:
    """The words spoken in `audio` (16 kHz mono float32 [N], a tensor or array); `language` None
    detects it. `source` names the file in errors."""
    _, whisper_timestamped = _whisper()
    audio = audio.float().cpu().numpy() if hasattr(audio, "numpy") else audio
    try:
        result = whisper_timestamped.transcribe(
            model, audio, language=language,
            temperature=0.0,  # greedy: deterministic, and whisper_timestamped's single-pass path
            # The model's channel is silent while the user speaks; not feeding a window's text
            # into the next keeps a hallucination on silence from repeating through the file.
            condition_on_previous_text=False,
            remove_empty_words=True,  # zero-length words closing a segment are mostly hallucinated
            fp16=model.device.type == "cuda",
            verbose=None,  # no progress bar per file: the caller logs one line per file
        )
    except ValueError as e:  # e.g. dtw's "no warping path" on audio the model cannot follow
        raise DataError(f"cannot transcribe {source or 'the audio'}: {e}") from None
    return words_from_result(result, len(audio) / WHISPER_SAMPLE_RATE)


def write_alignment(wav: Path, words: Sequence[Word], speaker: str = MAIN_SPEAKER) -> Path:
    """Write the JSON beside `wav`, keeping the other keys (`text_conditions`) of one already
    there. Atomic: a temporary file in the same folder, then a rename over the target."""
    path = alignment_path(wav)
    data = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            data = old if isinstance(old, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}  # a broken file is what --overwrite is for
    data["alignments"] = [[w.text, [w.start, w.end], speaker] for w in words]
    text = json.dumps(data, ensure_ascii=False) + "\n"
    # os.open rather than tempfile.mkstemp: the file gets the umask's permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it count as done
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def annotate_manifest(manifest: str | Path, model: str = DEFAULT_MODEL, device=None, language: str | None = "en",
                      overwrite: bool = False, log: Callable[[str], None] = print) -> Summary:
    """Transcribe channel 0 of every wav of `manifest` with the Whisper `model` (a name or a
    checkpoint path, see `load_whisper`) and write its alignment JSON. Files with a JSON already
    are skipped unless `overwrite`; the model is loaded only when a file needs it. `log` gets one
    line per file."""
    begin = time.perf_counter()
    entries = read_manifest(manifest)
    language = language_code(language)
    todo = []
    for entry in entries:
        target = alignment_path(entry.path)
        if target.exists() and not overwrite:
            log(f"skipped {entry.path.name}: {target.name} exists (--overwrite to redo it)")
        else:
            todo.append(entry)
    total = 0
    asr = load_whisper(model, device) if todo else None
    for entry in todo:
        words = transcribe(asr, model_channel(entry.path), language, entry.path)
        write_alignment(entry.path, words)
        log(f"annotated {entry.path.name}: {len(words)} words")
        total += len(words)
    return Summary(len(todo), len(entries) - len(todo), total, time.perf_counter() - begin)
