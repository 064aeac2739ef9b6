"""Kyutai STT's text stream as timed words, the way moshi-server tells them (delayed streams modelling).

    timing = SttTiming.of(model_config)          # from stt_config: audio delay and silence prefix
    words = WordTracker(timing, pad_id, end_pad_id)
    for token in tokens_of_each_step:            # one text token per 80 ms step of one stream
        for event in words.push(token):          # WordEvent(text tokens, start) / EndWord(stop)
            ...

An STT stream is Moshi's frame policy without a depth transformer: step 0 reads only initial
tokens, step s >= 1 reads input frame s - 1 (the official `run_inference` feeds the first frame
twice; moshi-server's `next_token` lags the codes one step: the same thing). The text of a step
describes the audio `audio_delay_seconds` earlier. The input starts with
`audio_silence_prefix_seconds` of silence (SttTiming.prefix_frames whole frames), which the times
do not count.

Words (moshi-server, `moshi-core/src/asr.rs`): after the delay, a text token that is neither
padding nor end of padding is a piece of the current word; the next padding or end-of-padding token
closes the word, which is then told (`Word`) with its start time: the time of the last end of
padding before it. An end-of-padding token marks a word boundary at its step: it ends the word told
before it (`EndWord`, its stop time) and is the start time of the next one. A time is
`(steps done - delay_tokens - prefix_frames) / 12.5` seconds, steps counted from the stream's first.
So a word that follows its end of padding at once starts at the step its first piece appears
minus the delay. A word still open when the input stops is not told (as moshi-server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FRAME_RATE = 12.5  # steps per second


@dataclass(frozen=True)
class SttTiming:
    """Where a stream's text sits against its audio, in steps."""

    delay_tokens: int  # steps between audio and its text (moshi-server's asr_delay_in_tokens)
    prefix_frames: int = 0  # frames of silence before the input

    @classmethod
    def of(cls, config, delay_tokens: int | None = None) -> "SttTiming":
        """From a `ModelConfig`'s stt_config: the delay rounded to whole steps (0.5 s -> 6, as
        moshi-server's stt-1b config; its stt-2.6b config says 32 for 2.5 s: pass `delay_tokens`),
        the prefix rounded up to whole frames, as delayed-streams-modeling's scripts."""
        stt = getattr(config, "stt_config", None) or {}
        if delay_tokens is None:
            delay_tokens = int(round(float(stt.get("audio_delay_seconds", 0.0)) * FRAME_RATE))
        prefix = math.ceil(float(stt.get("audio_silence_prefix_seconds", 0.0)) * FRAME_RATE - 1e-9)
        return cls(delay_tokens, max(prefix, 0))

    @property
    def skip(self) -> int:
        """Steps whose text is not about the input yet."""
        return self.delay_tokens + self.prefix_frames

    def seconds(self, steps: int) -> float:
        return round((steps - self.skip) / FRAME_RATE, 3)


@dataclass(frozen=True)
class WordEvent:
    tokens: tuple[int, ...]  # the word's text tokens (decode them with the tokenizer)
    start: float  # seconds


@dataclass(frozen=True)
class EndWord:
    stop: float  # seconds


@dataclass
class WordTracker:
    """One stream's words, step by step (see the module doc)."""

    timing: SttTiming
    pad_id: int = 3
    end_pad_id: int = 0
    steps: int = 0
    word: list[int] = field(default_factory=list)
    open_end: bool = False  # a word was told and its EndWord has not come yet
    last_stop: float = 0.0

    def push(self, token: int) -> list[WordEvent | EndWord]:
        """The events of the step that produced `token`."""
        self.steps += 1
        if self.steps < self.timing.skip:
            return []
        out: list[WordEvent | EndWord] = []
        if token in (self.pad_id, self.end_pad_id):
            if self.word:
                out.append(WordEvent(tuple(self.word), self.last_stop))
                self.word, self.open_end = [], True
        else:
            self.word.append(int(token))
        if token == self.end_pad_id:
            stop = self.timing.seconds(self.steps)
            if self.open_end:
                out.append(EndWord(stop))
                self.open_end = False
            self.last_stop = stop
        return out


@dataclass(frozen=True)
class TimedWord:
    text: str
    start: float
    stop: float | None  # None until its end of padding came


def timed_words(events: list[WordEvent | EndWord], decode) -> list[TimedWord]:
    """A stream's events as words with start and stop; `decode(tokens) -> str` (SentencePiece's)."""
    out: list[list] = []
    for e in events:
        if isinstance(e, WordEvent):
            out.append([decode(list(e.tokens)), e.start, None])
        elif out and out[-1][2] is None:
            out[-1][2] = e.stop
    return [TimedWord(*w) for w in out]
