"""The model's text stream as pieces and words with start times, and its JSON form.

The LM emits one text token per 80 ms frame; most are padding (TEXT_PADDING_ID) or the
end-of-padding marker (TEXT_END_PADDING_ID), which are never shown. The other tokens are
SentencePiece pieces: a piece starting with "▁" (U+2581) starts a new word, any other piece
continues the current one. A word starts at the time of its first piece.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID

HIDDEN_IDS = (TEXT_END_PADDING_ID, TEXT_PADDING_ID)
WORD_START = "\u2581"  # SentencePiece's word-boundary marker


@dataclass(frozen=True)
class Piece:
    id: int
    text: str  # the piece with "▁" turned into a space
    start: float  # seconds


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds, start time of its first piece


def pieces(tokens, times, tokenizer) -> list[Piece]:
    """Visible pieces of a token stream; tokens and times (seconds) of the same length."""
    out = []
    for token, t in zip(tokens, times):
        token = int(token)
        if token in HIDDEN_IDS or not 0 <= token < tokenizer.get_piece_size():
            continue
        out.append(Piece(token, tokenizer.id_to_piece(token).replace(WORD_START, " "), round(float(t), 3)))
    return out


def words(items: list[Piece]) -> list[Word]:
    """Pieces joined into words: a piece with a leading space starts a word."""
    out: list[list] = []
    for p in items:
        if p.text.startswith(" ") or not out:
            out.append([p.text.strip(), p.start])
        else:
            out[-1][0] += p.text
    return [Word(text, start) for text, start in out if text]


def text_of(items: list[Piece]) -> str:
    return "".join(p.text for p in items).strip()


def transcript_dict(tokens, times, tokenizer, source: str | None = None) -> dict:
    ps = pieces(tokens, times, tokenizer)
    out = {"text": text_of(ps), "words": [asdict(w) for w in words(ps)],
           "pieces": [asdict(p) for p in ps]}
    if source is not None:
        out = {"input": source, **out}
    return out


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
