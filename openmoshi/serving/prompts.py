"""Persona prompt phases inside the model loop's ticks (PersonaPlex), and the cache of prompted states.

A row opened with a `persona.Prompt` runs its prompt first, as forced frames in the same ticks as the
other rows (the user's side forced to the sine codes, no input read, nothing sent), and its
conversation starts (the handshake) only after it. The state a prompt leaves before its last step
(which samples the conversation's first frame with the row's own seeds) is kept per persona key
(voice, text) in a small LRU, and the next conversation with that persona starts from a copy of it
and runs that last step only. Worker thread only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from openmoshi.lm import generate as G
from openmoshi.lm.persona import Prompt, PromptCursor

PERSONA_CACHE = 16  # persona states kept at most ...
PERSONA_CACHE_BYTES = 2 * 1024 ** 3  # ... and their bytes (a 7B's: about 0.5 MB per prompt frame)


class PromptRunner:
    def __init__(self, cfg):
        self.cfg = cfg
        self.cache: OrderedDict[tuple, G.Snapshot] = OrderedDict()
        self.hits = 0

    def start(self, engine, row: int, prompt: Prompt, persona: tuple | None) -> tuple[PromptCursor, int]:
        """(cursor, steps already done) of a row starting `prompt`, from the cached state of
        `persona` when there is one."""
        cursor = PromptCursor(prompt, self.cfg)
        snap = self.cache.get(persona) if persona is not None else None
        if snap is None:
            return cursor, 0
        engine.gen.load_slot(row, snap)
        cursor.step = prompt.frames - 1
        self.cache.move_to_end(persona)
        self.hits += 1
        return cursor, cursor.step

    def inputs(self, engine, rows: dict[int, PromptCursor], codes: torch.Tensor):
        """(user codes, forced tokens, input embeddings) of a tick whose `rows` are in their prompt."""
        n, cfg = codes.shape[0], self.cfg
        user = codes.clone()
        forced = torch.full((n, 1 + cfg.gen_q), G.NOT_FORCED, dtype=torch.long)
        emb, use = None, torch.zeros(n, dtype=torch.bool)
        for row, cursor in rows.items():
            u, f, e = cursor.inputs()
            user[row, :u.shape[0]] = u.to(user.device)
            forced[row] = f
            if e is not None:
                emb = torch.zeros(n, 1, cfg.dim) if emb is None else emb
                emb[row, 0], use[row] = e, True
        embeddings = None if emb is None else (emb.to(engine.device), use.to(engine.device))
        return user, forced.to(engine.device), embeddings

    def stepped(self, engine, row: int, cursor: PromptCursor, persona: tuple | None) -> bool:
        """After a tick of the row's prompt: keeps the persona's state before its last step;
        True once the prompt is over (the row's Mimi states are then reset for the conversation)."""
        cursor.after_step(engine.gen, row)
        if (cursor.step == cursor.prompt.frames - 1 and persona is not None and not engine.gen.guided
                and persona not in self.cache):
            self.cache[persona] = engine.gen.save_slot(row)
            while len(self.cache) > PERSONA_CACHE or (
                    len(self.cache) > 1 and sum(s.nbytes for s in self.cache.values()) > PERSONA_CACHE_BYTES):
                self.cache.popitem(last=False)
        if not cursor.done:
            return False
        mask = engine.mask(row)
        for state in (engine.enc, engine.dec):
            if state is not None:
                state.reset(mask)
        return True
