"""The SentencePiece text tokenizer of the LM (`tokenizer_spm_32k_3.model`)."""

from __future__ import annotations

from pathlib import Path

from openmoshi.loading.files import CheckpointError


def load_text_tokenizer(path: str | Path):
    """A `sentencepiece.SentencePieceProcessor`; CheckpointError for a missing or foreign file."""
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"text tokenizer file not found: {path}")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception:
        raise CheckpointError(f"{path} is not a SentencePiece model") from None
    return sp
