"""The model's side of a turn: when a stretch of Moshi's speech starts and ends, read from its own
two streams every 80 ms frame.

Moshi is full duplex: it listens and produces a frame every 80 ms whether it speaks or not. Its
text stream (the inner monologue) leads its voice: while it says nothing the text is padding, and
its audio is near silence. A Realtime API response is one stretch of speech:

- it starts at the first frame that carries a word (a text piece that is not padding), or after
  `START_FRAMES` frames in a row whose audio is louder than `SPEECH_DBFS` (speech without words);
  the frames just before its first word or loud frame (`PREFIX_FRAMES`) are sent with it, for the
  onset of the first sound;
- it ends after `END_FRAMES` frames in a row (640 ms) with no word and audio quieter than
  `SPEECH_DBFS`; those frames are the response's last (the trailing sound of the last word).

An injected text (`lm.inject`) starts a stretch at its first frame (`begin`), even one of padding.

Frames outside a response are not sent: the client hears Moshi only while a response lasts.
"""

from __future__ import annotations

from collections import deque

import numpy as np

SPEECH_DBFS = -40.0  # a frame at least this loud (RMS, dB full scale) counts as the model's speech
START_FRAMES = 2  # loud frames in a row that start a response without a word (160 ms)
END_FRAMES = 8  # frames without a word and quieter than SPEECH_DBFS that end a response (640 ms)
PREFIX_FRAMES = 1  # frames sent before the frame that starts a response

STARTED, ENDED = "started", "ended"


def frame_dbfs(pcm: np.ndarray) -> float:
    """RMS level of a frame in dB full scale (a full-scale sine is -3 dBFS)."""
    return float(10 * np.log10(np.mean(pcm.astype(np.float64) ** 2) + 1e-12))


class ModelTurns:
    """`step(pcm, text)` per frame -> (transition, frames): transition is STARTED, ENDED or None,
    frames the (pcm, text) pairs that belong to the response (none while the model is silent)."""

    def __init__(self, speech_dbfs: float = SPEECH_DBFS, start_frames: int = START_FRAMES,
                 end_frames: int = END_FRAMES, prefix_frames: int = PREFIX_FRAMES):
        self.speech_dbfs, self.start_frames, self.end_frames = speech_dbfs, start_frames, end_frames
        self.speaking = False
        self.loud = 0  # loud frames in a row while silent
        self.quiet = 0  # frames in a row without a word or sound while speaking
        self.prefix_frames = prefix_frames
        self.recent: deque = deque(maxlen=prefix_frames + start_frames - 1)  # frames before a start

    def begin(self) -> None:
        """A stretch of speech starts at the next frame, whatever it holds (an injected text's
        first frame, see `lm.inject`); it ends as any other."""
        self.speaking, self.quiet, self.loud = True, 0, 0
        self.recent.clear()

    def step(self, pcm: np.ndarray, text: str | None) -> tuple[str | None, list]:
        loud = frame_dbfs(pcm) >= self.speech_dbfs
        if not self.speaking:
            self.loud = self.loud + 1 if loud else 0
            if text or self.loud >= self.start_frames:
                onset = self.prefix_frames + max(self.loud - 1, 0)  # the loud frames before this one, and the prefix
                frames = list(self.recent)[len(self.recent) - onset:] + [(pcm, text)] if onset else [(pcm, text)]
                self.speaking, self.quiet, self.loud = True, 0, 0
                self.recent.clear()
                return STARTED, frames
            self.recent.append((pcm, text))
            return None, []
        self.quiet = 0 if (text or loud) else self.quiet + 1
        if self.quiet >= self.end_frames:
            self.speaking, self.quiet = False, 0
            return ENDED, [(pcm, text)]
        return None, [(pcm, text)]
