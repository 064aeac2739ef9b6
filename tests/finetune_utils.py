"""Fine-tuning data for tests: synthetic stereo dialogues of real speech (espeak-ng) with exact
word times, in the moshi-finetune layout.

Each dialogue: the user asks a question on channel 1, then the model answers on channel 0. Words
are synthesised one by one and laid end to end, so each word's start and end are known exactly.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from openmoshi.audio import SAMPLE_RATE, load_audio, save_wav

QUESTIONS = ["what is the weather like", "tell me about music", "how are you today",
             "do you know some history", "can you count to three", "where do you live"]
ANSWER = "hello world moshi answers questions about science"
# Two questions, each with its own answer (no word in common): a model that learns them must listen.
QA = [("what is the weather like", "hello world moshi"), ("tell me about music", "one two three four")]
GAP = 0.06  # seconds of silence between words


@functools.lru_cache(maxsize=None)
def word_audio(word: str) -> torch.Tensor:
    """[N] float32 at 24 kHz: one word spoken by espeak-ng (cached on disk across runs)."""
    cache = Path(tempfile.gettempdir()) / "openmoshi_test_words"
    cache.mkdir(exist_ok=True)
    path = cache / f"{word}.wav"
    if not path.exists():
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("espeak-ng is needed (apt-get install espeak-ng)")
        tmp = cache / f".{word}.{id(path)}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "170", "-w", str(tmp), word], check=True,
                       capture_output=True)
        tmp.replace(path)
    pcm = load_audio(path)[0]
    nonzero = (pcm.abs() > 1e-3).nonzero()
    return pcm[nonzero[0]:nonzero[-1] + 1] if len(nonzero) else pcm  # trim espeak's silences


def speak(text: str, start: float) -> tuple[torch.Tensor, list[list]]:
    """(pcm [N] beginning at `start` seconds, [[word, [start, end]], ...])."""
    pieces, words, t = [torch.zeros(int(start * SAMPLE_RATE))], [], start
    for word in text.split():
        audio = word_audio(word)
        words.append([word, [round(t, 4), round(t + len(audio) / SAMPLE_RATE, 4)]])
        pieces += [audio, torch.zeros(int(GAP * SAMPLE_RATE))]
        t += len(audio) / SAMPLE_RATE + GAP
    return torch.cat(pieces), words


def make_dialogue(wav: Path, question: str, answer: str = ANSWER, answer_start: float | None = None) -> dict:
    """Writes a stereo dialogue and its alignment JSON; returns its manifest line. The answer starts
    0.4 s after the question ends, or at `answer_start` seconds."""
    user, user_words = speak(question, 0.3)
    model, model_words = speak(answer, answer_start or len(user) / SAMPLE_RATE + 0.4)
    n = max(len(user), len(model)) + int(0.4 * SAMPLE_RATE)
    pcm = torch.zeros(2, n)
    pcm[0, :len(model)], pcm[1, :len(user)] = model, user
    save_wav(wav, pcm, SAMPLE_RATE)
    alignments = [[w, ts, "SPEAKER_MAIN"] for w, ts in model_words] + [[w, ts, "SPEAKER_OTHER"] for w, ts in user_words]
    wav.with_suffix(".json").write_text(json.dumps({"alignments": sorted(alignments, key=lambda a: a[1][0])}))
    return {"path": wav.name, "duration": round(n / SAMPLE_RATE, 3)}


def make_dataset(folder: Path, count: int, answer: str = ANSWER, name: str = "data",
                 answer_start: float | None = None, pairs: list[tuple[str, str]] | None = None) -> Path:
    """`count` dialogues and their manifest `name`.jsonl in `folder`: the QUESTIONS in turn, each
    answered with `answer`, or the (question, answer) `pairs` in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = pairs or [(q, answer) for q in QUESTIONS]
    lines = [make_dialogue(folder / f"{name}_{i}.wav", *pairs[i % len(pairs)], answer_start=answer_start)
             for i in range(count)]
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest
