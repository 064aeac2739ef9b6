"""The moshi-finetune data layout: a `.jsonl` manifest and a word-alignment JSON beside each wav.

    data.jsonl:  {"path": "a.wav", "duration": 24.5}          one conversation per line, paths
                                                               relative to the manifest
    a.wav:       stereo, channel 0 the model (assistant), channel 1 the user
    a.json:      {"alignments": [["hello", [0.50, 0.82], "SPEAKER_MAIN"], ...],
                  "text_conditions": {...}}                    (optional, conditioned models)

Only the words of `SPEAKER_MAIN` (the model's channel) enter the text stream. Every problem is a
`DataError` that names the file (and line) and says what to fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from openmoshi.errors import UserError

MAIN_SPEAKER = "SPEAKER_MAIN"


class DataError(UserError):
    """Training data that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Entry:
    path: Path  # the wav, absolute
    duration: float  # seconds, as the manifest says


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float


@dataclass(frozen=True)
class Alignment:
    words: tuple[Word, ...]  # the main speaker's words, sorted by start
    text_conditions: dict | None = field(default=None)


def alignment_path(wav: Path) -> Path:
    return wav.with_suffix(".json")


def read_manifest(path: str | Path) -> list[Entry]:
    """The entries of a `.jsonl` manifest, each wav checked to exist."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest {path} does not exist")
    if not path.is_file():
        raise DataError(f"manifest {path} is not a file")
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"manifest {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg}); each line must be "
                            '{"path": "a.wav", "duration": 12.5}') from None
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise DataError(f'{where}: expected {{"path": "a.wav", "duration": SECONDS}}, got {line.strip()[:80]}')
        duration = item.get("duration")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
                or duration <= 0:
            raise DataError(f"{where}: 'duration' must be a positive number of seconds, got {duration!r}")
        wav = (path.parent / item["path"]).resolve()
        if not wav.is_file():
            raise DataError(f"{where}: audio file {wav} does not exist")
        entries.append(Entry(wav, float(duration)))
    if not entries:
        raise DataError(f"manifest {path} lists no audio files")
    return entries


def read_alignments(wav: Path, audio_seconds: float | None = None, speaker: str = MAIN_SPEAKER) -> Alignment:
    """The main speaker's words from the JSON beside `wav`. Words with no duration are dropped (as
    moshi-finetune does); a word outside the audio (`audio_seconds`) is an error: the alignment
    belongs to another file or another cut."""
    path = alignment_path(wav)
    if not path.is_file():
        raise DataError(f"no alignment file {path} for {wav.name}: write one with 'openmoshi annotate MANIFEST'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); 'openmoshi annotate MANIFEST --overwrite' rewrites it") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise DataError(f'{path}: expected {{"alignments": [[word, [start, end], speaker], ...]}}')
    conditions = data.get("text_conditions")
    if conditions is not None and not isinstance(conditions, dict):
        raise DataError(f"{path}: 'text_conditions' must be an object, got {type(conditions).__name__}")
    words = []
    for i, item in enumerate(data["alignments"]):
        try:
            text, (start, end), who = item
            start, end = float(start), float(end)
            if not isinstance(text, str) or not isinstance(who, str) or not (math.isfinite(start) and math.isfinite(end)):
                raise TypeError
        except (TypeError, ValueError):
            raise DataError(f"{path}: alignment {i} is {json.dumps(item)[:80]}; expected "
                            '[word, [start_seconds, end_seconds], speaker]') from None
        if audio_seconds is not None and (start < 0 or start >= audio_seconds):
            raise DataError(f"{path}: word {text!r} at {start:.2f}-{end:.2f} s is outside the audio "
                            f"({audio_seconds:.2f} s): is this the alignment of another file?")
        if who == speaker and end > start and text.strip():
            words.append(Word(text.strip(), start, end))
    words.sort(key=lambda w: w.start)
    return Alignment(tuple(words), conditions)
