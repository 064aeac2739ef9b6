"""The text stream of a segment on the 12.5 Hz frame grid ("inner monologue", Moshi section 3.4.4).

    frame:    0   1   2   3   4   5   6   7   8   9
    words:            "hello" (2 tokens) at 0.2 s     "world" at 0.5 s
    stream:   3   0   he  llo 3   0   wor ld  3   3      (3: padding, 0: end of padding)

A word's tokens go on consecutive frames from floor(start * 12.5) (its start relative to the
segment), the frame just before a word becomes the end-of-padding id when it held padding, and
every other frame is padding. Frames past the end of the audio are the zero token (-1), which the
loss ignores. Words that start before the segment belong to the previous one; tokens that do not
fit before the segment's end are cut.

One deliberate difference from moshi-finetune: when a word starts before the previous word's
tokens are all out (fast speech, or a long word), its tokens follow the previous word's instead
of cutting them short; the official trainer drops the rest of the previous word.
"""

from __future__ import annotations

import math

from openmoshi.lm.config import TEXT_END_PADDING_ID, TEXT_PADDING_ID, ZERO_TOKEN

FRAME_RATE = 12.5


def text_stream(words: list[tuple[float, list[int]]], start: float, num_frames: int,
                audio_frames: int | None = None, frame_rate: float = FRAME_RATE) -> list[int]:
    """words: (start seconds, token ids) sorted by start, in file time; start: the segment's first
    frame in seconds; num_frames: the segment's length; audio_frames: how many of its frames hold
    audio (the rest get ZERO_TOKEN). -> token ids [num_frames]."""
    audio_frames = num_frames if audio_frames is None else audio_frames
    out = [TEXT_PADDING_ID] * audio_frames + [ZERO_TOKEN] * (num_frames - audio_frames)
    free = 0  # first frame not taken by an earlier word's tokens
    for word_start, tokens in words:
        t = math.floor((word_start - start) * frame_rate + 1e-6)  # 1e-6: 0.08 * 12.5 is frame 1
        if t < 0 or t >= audio_frames or not tokens:
            continue
        t = max(t, free)
        if t >= audio_frames:
            break
        if t > 0 and out[t - 1] == TEXT_PADDING_ID:
            out[t - 1] = TEXT_END_PADDING_ID
        for token in tokens[: audio_frames - t]:
            out[t] = token
            t += 1
        free = t
    return out
