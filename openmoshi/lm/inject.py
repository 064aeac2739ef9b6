"""Injected speech (issue 22): a text the model says in its own voice, as forced tokens of its
inner monologue.

Moshi's text stream has one token per 80 ms frame: mostly padding, a word's SentencePiece pieces
on consecutive frames from where the word starts, and the frame just before a word set to
end-of-padding (the training convention, see `training.text_stream`). Its voice follows its text:
the depth transformer samples each frame's audio conditioned on that frame's text token. So forcing
the text tokens of a sentence, laid out on that grid, makes the model speak it; the audio is still
its own sampling. The layout is a steady speaking rate, one word after the other:

    "hello big world" (pieces he|llo, big, wor|ld), WORD_PAUSE = 2, 0 end-of-padding, 3 padding:

    frame:  0  1   2    3  4  5  6    7  8  9  10   11  12 13
    token:  0  he  llo  3  3  0  big  3  3  0  wor  ld  3  3

Each word: end-of-padding, its pieces one a frame, then WORD_PAUSE frames of padding (a one-piece
word takes 4 frames, 320 ms: about 3 words a second, a conversational pace). The model's own
sampling resumes after the last padding frame. Pieces the model never says are left out: padding,
end-of-padding and SentencePiece's unknown piece (id 0 in Moshi's tokenizer, the end-of-padding id),
and so a word made of unknown characters only.
"""

from __future__ import annotations

from openmoshi.errors import UserError
from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID

WORD_PAUSE = 2  # padding frames after each word's pieces (before the next word's end-of-padding)
MAX_INJECT_CHARS = 2000  # longest text one injection takes (about 6 minutes of speech at most)


class InjectError(UserError):
    """A text that cannot be injected (empty, too long, nothing the tokenizer can say)."""


def place_words(words: list[list[int]], pad: int = TEXT_PADDING_ID, end_pad: int = TEXT_END_PADDING_ID,
                pause: int = WORD_PAUSE) -> list[int]:
    """The text-stream tokens of `words` (each a list of piece ids), one per frame (module doc)."""
    out: list[int] = []
    for pieces in words:
        if pieces:
            out += [end_pad, *pieces] + [pad] * pause
    return out


def inject_tokens(tokenizer, text: str, cfg, pause: int = WORD_PAUSE) -> list[int]:
    """The forced text tokens, one per frame, that make a model of config `cfg` (`LMConfig`) say
    `text`; `tokenizer`: its SentencePiece processor. InjectError when there is nothing to say."""
    if not isinstance(text, str) or not text.strip():
        raise InjectError("the text to say is empty")
    if len(text) > MAX_INJECT_CHARS:
        raise InjectError(f"the text to say has {len(text)} characters, more than the limit of {MAX_INJECT_CHARS}")
    hidden = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id, 0}
    words = []
    for word in text.split():
        pieces = [int(t) for t in tokenizer.encode(word) if int(t) not in hidden]
        if pieces and not tokenizer.decode(pieces).strip():
            pieces = []  # only a word-start marker left (the word was unknown pieces)
        bad = [t for t in pieces if not 0 <= t < cfg.text_card]
        if bad:
            raise InjectError(f"the tokenizer gives id {bad[0]}, outside the model's {cfg.text_card} text tokens "
                              "(a tokenizer that does not belong to this model)")
        words.append(pieces)
    tokens = place_words(words, cfg.existing_text_padding_id, cfg.existing_text_end_padding_id, pause)
    if not tokens:
        raise InjectError("the text to say has no word the model's tokenizer knows")
    return tokens
