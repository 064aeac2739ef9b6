"""Personas of the server's conversations (PersonaPlex): the query parameters `text_prompt` and
`voice_prompt` (a file name in `serve --voice-prompt-dir`) made into a `persona.Prompt` and the
key its state is cached under in the model loop (`prompts`).

    personas = Personas(lm, mimi, tokenizer, voice_dir)
    personas.voices()                                   # GET /api/voices
    prompt, key = await personas.prompt(query)         # (None, None) without persona parameters

A voice file is read (and, for audio, Mimi-encoded) once, in a thread off the event loop, and
kept (while the file is unchanged). Every problem is a ValueError whose message the client gets:
an unknown voice, a preset that is not a tensor dict, an empty text or a prompt too long for the
context window; the server goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path

from openmoshi.lm.persona import Prompt, build_prompt, check_model, wrap_system
from openmoshi.loading.voices import list_voices, load_voice, resolve_voice

PERSONA_PARAMS = ("text_prompt", "voice_prompt")  # the web UI's names too (web/protocol.js)
VOICES_ROUTE = "/api/voices"
MAX_TEXT_CHARS = 4000  # refused before tokenizing; the frame limit of the context window applies after


class Personas:
    def __init__(self, lm, mimi, tokenizer, voice_dir: str | Path | None = None):
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.voice_dir = None if voice_dir is None else Path(voice_dir)
        if self.voice_dir is not None:
            list_voices(self.voice_dir)  # a missing folder is an error at start, not at the first call
        self._voices: dict[str, tuple[float, object]] = {}  # name -> (mtime, codes or Preset)
        self._lock = threading.Lock()  # one voice encoded at a time

    def voices(self) -> list[str]:
        return [] if self.voice_dir is None else list_voices(self.voice_dir)

    def _voice(self, name: str) -> tuple[float, object]:
        """(the file's mtime, its codes or Preset)."""
        if self.voice_dir is None:
            raise ValueError("this server has no voices (start it with --voice-prompt-dir DIR)")
        path = resolve_voice(self.voice_dir, name)
        mtime = path.stat().st_mtime
        with self._lock:
            cached = self._voices.get(name)
            if cached is None or cached[0] != mtime:
                cached = (mtime, load_voice(path, self.mimi, self.lm.cfg))
                self._voices[name] = cached
        return cached

    async def prompt(self, query: Mapping[str, str]) -> tuple[Prompt | None, tuple | None]:
        """The prompt and cache key of a conversation's query; ValueError with a readable message."""
        text, voice = query.get(PERSONA_PARAMS[0]), query.get(PERSONA_PARAMS[1]) or None
        if text is None and voice is None:
            return None, None
        check_model(self.lm.cfg)  # before any work on the text or the voice
        if text is not None and len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"the text prompt has {len(text)} characters, more than {MAX_TEXT_CHARS}")
        tokens = None if text is None else self.tokenizer.encode(wrap_system(text))
        mtime, codes = (None, None) if voice is None else await asyncio.to_thread(self._voice, voice)
        # A voice file changed since is another persona.
        return build_prompt(self.lm.cfg, codes, tokens), (voice, mtime, None if text is None else wrap_system(text))
