"""Slot states: the streaming state of a batch of conversations, each field declared once.

A slot is one conversation's place in a batch. Every streaming state (a transformer's KV cache,
Mimi's conv buffers, the LM's token streams and sampler) is a dataclass deriving from `SlotState`
whose fields say, where they are declared, how they sit on the batch axis:

    per_slot(reset)    a tensor (or a list of them, or None) with the slots on dim 0
    per_row(reset)     the same over rows, `rows_per_slot` of them per slot, side by side: under
                       classifier-free guidance slot b owns the transformers' rows 2b and 2b + 1
    nested(rows)       a slot state (or a list of them, None entries allowed) over the slots, or
                       over the rows with rows=True
    scratch(rows)      a nested state that every step rebuilds before reading it (the depth
                       transformer's cache): prefix views only, nothing to move, reset or save
    host(default)      a Python value: copied into a prefix, untouched by move and reset
    shared()           the same object in every prefix: constants, and host flags every view must see

and what `reset` does to a tensor: `reset=value` fills the slot with it (the conversation's
content); `reset=None` keeps it (a setting: temperatures, seeds, the condition survive a reset);
`reset=UNREAD` leaves content in place that another field marks unread (keys and values of the KV
cache once `key_pos` is -1; clearing them would write the whole cache).

From the declarations come, on every state:

    view = state.prefix(n)       slots [0, n) (rows [0, r n)) as views: a step on it updates `state`
    view = state.view(a, b)      slots [a, b) the same way (a server's phase group of rows)
    state.move(src, dst)         slot dst takes over slot src's conversation, settings included
    state.reset(mask)            a new conversation in the slots where mask [B] is True (None: all)
    state.nbytes                 bytes of its slot tensors (shared ones not counted)
    snap = state.save_slot(b)    a copy of slot b's conversation: its content, not its settings
    state.load_slot(b, snap)     slot b continues that conversation (any slot, a same-shaped state)

A field without a declaration is an error (`SlotState.declarations` names it), so a new field
cannot be forgotten by one of these. None of them is called per step: a server takes a prefix
once per batch size, and moves or resets slots between frames.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

UNREAD = "unread"  # `reset=UNREAD`: content that reset leaves in place, unread until written again
_KEY = "openmoshi.slots"  # the field metadata key of a declaration
_TENSOR, _NESTED, _SCRATCH, _HOST, _SHARED = "tensor", "nested", "scratch", "host", "shared"


@dataclass(frozen=True)
class Declaration:
    kind: str  # one of _TENSOR, _NESTED, _SCRATCH, _HOST, _SHARED
    rows: bool = False  # on the rows (rows_per_slot per slot) rather than the slots
    reset: Any = None  # tensors: the value a reset writes, None for a setting, or UNREAD

    @property
    def content(self) -> bool:
        """Part of a conversation's snapshot: a tensor that is not a setting, or a nested state."""
        return (self.kind == _TENSOR and self.reset is not None) or self.kind == _NESTED


def per_slot(reset: Any = None):
    """A tensor [B, ...] (or a list of them, or None); `reset` as the module doc says."""
    return field(metadata={_KEY: Declaration(_TENSOR, False, reset)})


def per_row(reset: Any = None):
    """A tensor [B * rows_per_slot, ...], each slot's rows side by side."""
    return field(metadata={_KEY: Declaration(_TENSOR, True, reset)})


def nested(rows: bool = False):
    """A slot state (or a list of them, or None) over the slots, or over the rows."""
    return field(metadata={_KEY: Declaration(_NESTED, rows)})


def scratch(rows: bool = False):
    """A slot state that every step rebuilds before reading it: only its prefix views matter."""
    return field(metadata={_KEY: Declaration(_SCRATCH, rows)})


def host(default: Any = MISSING):
    """A Python value kept on the host: each prefix has its own copy."""
    return field(default=default, metadata={_KEY: Declaration(_HOST)})


def shared():
    """The same object in a state and all its prefixes."""
    return field(metadata={_KEY: Declaration(_SHARED)})


def _items(value) -> list:
    """A field's value as a list of its entries (a tensor, a state, or a list of them; None skipped)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [v for v in value if v is not None]
    return [value]


def _map(fn, value):
    """fn over a field's entries, keeping its shape (None, one entry, or a list with None entries)."""
    if value is None:
        return None
    if isinstance(value, list):
        return [None if v is None else fn(v) for v in value]
    return fn(value)


def _widen(s: slice, r: int) -> slice:
    """The rows of the slots in `s`, r rows per slot."""
    return s if r == 1 else slice(s.start * r, s.stop * r)


def _tensor_bytes(value) -> int:
    return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes for t in _items(value))


class _Mask:
    """A reset's mask [B] bool, with its views for each tensor rank made once for all the fields
    (a server resets slots of its Mimi states, some forty tensors, at every frame)."""

    def __init__(self, mask: torch.Tensor):
        self.mask, self._views, self._widened = mask, {}, {}

    def view_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask on x's device, shaped [B, 1, ...] to broadcast over x [B, ...]."""
        view = self._views.get(x.dim())
        if view is None:
            view = self._views[x.dim()] = self.mask.to(x.device).view((-1,) + (1,) * (x.dim() - 1))
        return view

    def widened(self, r: int) -> "_Mask":
        """The mask over rows, r per slot."""
        if r == 1:
            return self
        if r not in self._widened:
            self._widened[r] = _Mask(self.mask.repeat_interleave(r))
        return self._widened[r]


@dataclass(frozen=True)
class Snapshot:
    """One slot's conversation copied out of a state (`save_slot`): by field name, its rows (a
    tensor, a list of them) or a nested state's Snapshot; read as attributes (`snap.temporal.offset`)."""

    parts: dict[str, Any]

    def __getattr__(self, name: str):
        parts = self.__dict__.get("parts")
        if parts is None or name not in parts:
            raise AttributeError(name)
        return parts[name]

    @property
    def nbytes(self) -> int:
        return sum(_tensor_bytes(v) for v in self.parts.values())


class SlotState:
    """Base of the slot states: dataclasses whose every field is declared (see the module doc)."""

    @property
    def rows_per_slot(self) -> int:
        """Rows of `per_row` tensors and `rows=True` nested states per slot."""
        return 1

    @classmethod
    def declarations(cls) -> tuple[tuple[str, Declaration], ...]:
        """(name, declaration) of every field; TypeError naming a field declared without one."""
        found = cls.__dict__.get("_declarations")
        if found is None:
            missing = [f.name for f in fields(cls) if _KEY not in f.metadata]
            if missing:
                raise TypeError(f"{cls.__name__} fields without a slot declaration (per_slot, per_row, nested, "
                                f"scratch, host, shared): {', '.join(missing)}")
            found = tuple((f.name, f.metadata[_KEY]) for f in fields(cls))
            cls._declarations = found
        return found

    # ------------------------------------------------------------------ views

    def prefix(self, n: int):
        """Slots [0, n) as views: a step on the prefix updates this state in place and computes
        only what those slots need. Host values are copied, shared objects are the same."""
        return self.view(0, n)

    def view(self, start: int, stop: int):
        """Slots [start, stop) as views, as `prefix` (a server's phase group of rows). A scratch
        state is rebuilt by every step before it is read, so its first stop - start slots serve."""
        view = copy.copy(self)
        r = self.rows_per_slot
        for name, d in self.declarations():
            if d.kind in (_TENSOR, _NESTED):
                a, b = (start * r, stop * r) if d.rows else (start, stop)
                cut = (lambda t: t[a:b]) if d.kind == _TENSOR else (lambda s: s.view(a, b))
                setattr(view, name, _map(cut, getattr(self, name)))
            elif d.kind == _SCRATCH:
                k = (stop - start) * (r if d.rows else 1)
                setattr(view, name, _map(lambda s: s.prefix(k), getattr(self, name)))
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of the state's slot tensors, nested states included (what grows with the batch)."""
        total = 0
        for name, d in self.declarations():
            if d.kind == _TENSOR:
                total += _tensor_bytes(getattr(self, name))
            elif d.kind in (_NESTED, _SCRATCH):
                total += sum(s.nbytes for s in _items(getattr(self, name)))
        return total

    # ------------------------------------------------------------------ between frames

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes over slot `src`'s conversation: its content and settings, all its rows.
        (Slot `src` keeps a copy: reset it or leave it idle.)"""
        self._move(slice(src, src + 1), slice(dst, dst + 1))

    def _move(self, src: slice, dst: slice) -> None:
        r = self.rows_per_slot
        for name, d in self.declarations():
            if d.kind not in (_TENSOR, _NESTED):
                continue
            a, b = (_widen(src, r), _widen(dst, r)) if d.rows else (src, dst)
            for x in _items(getattr(self, name)):
                if d.kind == _TENSOR:
                    x[b].copy_(x[a])
                else:
                    x._move(a, b)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """A new conversation in the slots where `mask` [B] bool is True (every slot when None):
        each tensor declared with a reset value gets it there; settings stay."""
        self._reset(None if mask is None else _Mask(mask))

    def _reset(self, mask: _Mask | None) -> None:
        rows_mask = mask if mask is None else mask.widened(self.rows_per_slot)
        for name, d in self._cleared():
            m = rows_mask if d.rows else mask
            value = getattr(self, name)
            for x in value if isinstance(value, list) else (value,):
                if x is None:
                    continue
                if d.kind == _NESTED:
                    x._reset(m)
                elif m is None:
                    x.fill_(d.reset)
                else:
                    x.masked_fill_(m.view_for(x), d.reset)

    @classmethod
    def _cleared(cls) -> tuple[tuple[str, Declaration], ...]:
        """The fields a reset writes (tensors with a reset value) or passes on (nested states):
        worked out once per class, since a server resets some slots at every frame."""
        found = cls.__dict__.get("_cleared_fields")
        if found is None:
            found = tuple((name, d) for name, d in cls.declarations()
                          if d.kind == _NESTED or (d.kind == _TENSOR and d.reset not in (None, UNREAD)))
            cls._cleared_fields = found
        return found

    def save_slot(self, slot: int) -> Snapshot:
        """A copy of slot `slot`'s conversation: every tensor with a reset value or UNREAD (not
        the settings), through nested states."""
        return self._save(slice(slot, slot + 1))

    def _save(self, s: slice) -> Snapshot:
        r, parts = self.rows_per_slot, {}
        for name, d in self.declarations():
            if not d.content:
                continue
            rows = _widen(s, r) if d.rows else s
            value = getattr(self, name)
            if d.kind == _TENSOR:
                parts[name] = _map(lambda t: t.clone(), self._saved(name, _map(lambda t: t[rows], value), rows))
            else:
                parts[name] = _map(lambda x: x._save(rows), value)
        return Snapshot(parts)

    def _saved(self, name: str, rows, which: slice):
        """What a snapshot keeps of field `name`'s `rows` (the rows `which`): all of them here; a
        state overrides this to keep less (the filled part of a KV cache)."""
        return rows

    def load_slot(self, slot: int, snap: Snapshot) -> None:
        """Slot `slot` continues the conversation of `snap` (from `save_slot` of a state of the same
        kind and shapes); its settings stay. A tensor saved shorter (a KV cache's filled part)
        fills the start of the slot's."""
        self._load(slice(slot, slot + 1), snap)

    def _load(self, s: slice, snap: Snapshot) -> None:
        r = self.rows_per_slot
        for name, d in self.declarations():
            if not d.content:
                continue
            rows = _widen(s, r) if d.rows else s
            value, saved = getattr(self, name), snap.parts.get(name)
            targets, parts = _flat(value), _flat(saved)
            if [x is None for x in targets] != [x is None for x in parts]:
                raise ValueError(f"{type(self).__name__}.{name}: the snapshot is of a state of another layout")
            for x, p in zip(targets, parts):
                if x is None:
                    continue
                if d.kind == _TENSOR:
                    x[rows][tuple(slice(0, n) for n in p.shape)].copy_(p)
                else:
                    x._load(rows, p)


def _flat(value) -> list:
    """A field's value as a list with its None entries (a single value: one entry)."""
    return list(value) if isinstance(value, list) else [value]
