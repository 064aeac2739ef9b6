"""Kyutai TTS's script: the text to speak as words, and the state machine that feeds them to the LM.

A delayed-streams TTS (Kyutai, "Delayed Streams Modeling", 2025) starts from plain text, not from
text already aligned in time: the LM itself decides, frame by frame, when the next word starts.
Its text stream samples one of two special tokens, PAD ("nothing new") or NEW_WORD ("a word
starts at the next frame"); the state machine (`advance`) then pops the next word of the script
and feeds its tokens over the next frames, one per frame, in place of what the LM sampled. The
audio, delayed by `tts_config.audio_delay`, follows the text it was given.

    entries = script_to_entries(tokenizer, ["Hello there.", "Hi!"], frame_rate=12.5)
    script = new_script(entries, machine)
    token, consumed = advance(machine, script, step, sampled)   # once per frame, on the host

Rules (as the official `moshi.models.tts.StateMachine`):
- a sampled token that is neither PAD nor NEW_WORD counts as PAD;
- PAD is forced while a word's tokens are still being fed, and for `forced_padding` frames (the
  first `initial_padding` frames, then each entry's `padding`: `<break time="1.5s"/>` pauses, and
  `padding_between` frames after each word, more for longer words);
- NEW_WORD is forced after `max_padding` PADs in a row (the model may not stall);
- NEW_WORD pops an entry: a word queues its tokens (fed from this frame on) and, with a second
  text stream (`second_stream_ahead` = n), the tokens of the n-th next word go on that stream; a
  break only starts its forced padding. A turn's first word carries the speaker token (MAIN or
  OTHER) when the model is multi-speaker;
- NEW_WORD with no entry left marks the end (`end_step`); with a second stream, that first
  attempt still feeds NEW_WORD on it.
With a second stream, each frame's text id muxes both streams: `(second + 1) * card + first`, where
`card` is text_card + 1 and second = -1 means "nothing" (see `LMModel`'s demux embedding); a
NEW_WORD goes on the second stream, and the main stream then reads the word's first token.

Word timings: `script.transcript` lists (word, step), the frame at which each word's tokens start;
the word is heard `audio_delay` later, which is where the decoded audio begins: a word starts at
step / frame_rate seconds of the output.

This module is plain Python: no torch, no tensors.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

# Special text ids of the TTS models (their text vocabulary's first pieces).
NEW_WORD = 0
MAIN_SPEAKER = 1
OTHER_SPEAKER = 2
PAD = 3
ZERO = -1  # embedded as zeros: "no text"
SPEAKERS = (MAIN_SPEAKER, OTHER_SPEAKER)

# `<break time="1.5s"/>` (the one SSML tag supported) or a run of white space: what separates words.
_SEPARATOR = re.compile(r'(?:<break\s+time="([0-9]+(?:.[0-9]*)?)s"\s*/?>)|(?:\s+)')
# Characters removed or replaced before splitting, as the official preprocessing.
_REPLACE = (("\u2019", "'"), (":", " "), ("(", ""), (")", ""))


@dataclass(frozen=True)
class Entry:
    """One word to say (its tokens and text), or a break (no tokens); `padding` frames of forced
    PAD follow it."""

    tokens: tuple[int, ...]
    text: str
    padding: int = 0


@dataclass(frozen=True)
class Machine:
    """The state machine's settings (defaults: `moshi-tts`'s). `card` is text_card + 1."""

    card: int
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2


@dataclass
class Script:
    """One stream's progress through its script (host state, one per slot)."""

    entries: deque  # of Entry, still to say
    remaining_padding: int  # PADs still allowed in a row before NEW_WORD is forced
    forced_padding: int  # PADs still forced
    queued: deque = field(default_factory=deque)  # tokens of the current word still to feed
    lookahead_queued: deque = field(default_factory=deque)  # tokens for the second stream
    end_step: int | None = None  # the step at which NEW_WORD found no entry left
    consumption_times: list[int] = field(default_factory=list)  # step of each entry popped
    transcript: list[tuple[str, int]] = field(default_factory=list)  # (word, step) of each word

    def tokens_ahead(self, n: int) -> tuple[int, ...]:
        """The tokens of the n-th word still in `entries` (breaks skipped); () when there is none."""
        for entry in self.entries:
            if entry.tokens:
                n -= 1
                if n == 0:
                    return entry.tokens
        return ()

    def words_ahead(self) -> int:
        return sum(1 for e in self.entries if e.tokens)


def new_script(entries: Sequence[Entry], machine: Machine) -> Script:
    return Script(entries=deque(entries), remaining_padding=machine.initial_padding,
                  forced_padding=machine.initial_padding)


def advance(machine: Machine, script: Script, step: int, sampled: int) -> tuple[int, bool]:
    """The LM sampled `sampled` at frame `step`: returns (the text id the LM reads for this frame,
    whether an entry was popped). See the module doc for the rules."""
    wants_word = sampled == NEW_WORD
    if script.queued or script.forced_padding > 0:
        wants_word = False
    elif script.remaining_padding <= 0:
        wants_word = True
    popped = False
    if wants_word:
        if script.entries:
            entry = script.entries.popleft()
            script.consumption_times.append(step)
            popped = True
            if entry.tokens:
                script.transcript.append((entry.text, step))
                script.queued.extend(entry.tokens)
                if machine.second_stream_ahead:
                    script.lookahead_queued.extend(script.tokens_ahead(machine.second_stream_ahead))
                script.remaining_padding = machine.max_padding
            else:
                wants_word = False  # a break: it only pads
            script.forced_padding = entry.padding
        else:
            # Nothing left to say: the end. A model with a second stream still reads NEW_WORD there
            # the first time.
            wants_word = bool(machine.second_stream_ahead) and script.end_step is None
            if script.end_step is None:
                script.end_step = step
    if wants_word:
        first = NEW_WORD
    else:
        script.remaining_padding = max(0, script.remaining_padding - 1)
        script.forced_padding = max(0, script.forced_padding - 1)
        first = script.queued.popleft() if script.queued else PAD
    if not machine.second_stream_ahead:
        return first, popped
    second = ZERO
    if first == NEW_WORD:  # (also a word token of id 0, the unknown piece, as the official machine)
        second = NEW_WORD  # the second stream says "new word"; the main one goes on with the word
        first = script.queued.popleft() if script.queued else PAD
    elif script.lookahead_queued:
        second = script.lookahead_queued.popleft()
    return (second + 1) * machine.card + first, popped


def script_to_entries(tokenizer, turns: Sequence[str], frame_rate: float, multi_speaker: bool = True,
                      padding_between: int = 0) -> list[Entry]:
    """Turns (the first is the main speaker's, then they alternate; an empty first turn starts with
    the other speaker) -> entries. `tokenizer.encode(word)` gives a word's tokens (SentencePiece).
    `<break time="Xs"/>` becomes a break of round(X * frame_rate) frames. `padding_between` > 0
    forces that many PADs after each word, plus one per extra token of the word."""
    entries: list[Entry] = []
    last_speaker = None
    for index, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise TypeError(f"turn {index} is not a string: {turn!r}")
        for old, new in _REPLACE:
            turn = turn.replace(old, new)
        first_of_turn = True
        words: list[str | float] = []  # words, and break durations in seconds
        while turn:
            match = _SEPARATOR.search(turn)
            if match is None:
                break
            if match.start():
                words.append(turn[:match.start()])
            if match.group(1):
                words.append(float(match.group(1)))
            turn = turn[match.end():]
        if turn:
            words.append(turn)
        for word in words:
            if isinstance(word, float):
                entries.append(Entry((), "", int(round(word * frame_rate))))
                continue
            tokens = list(tokenizer.encode(word))
            if first_of_turn:
                speaker = index % len(SPEAKERS)
                if multi_speaker and speaker != last_speaker:
                    last_speaker = speaker
                    tokens.insert(0, SPEAKERS[speaker])
                first_of_turn = False
            padding = max(0, padding_between + len(tokens) - 1) if padding_between > 0 else 0
            entries.append(Entry(tuple(tokens), word, padding))
    return entries
