"""Every field of every streaming state, one at a time: prefix, move, reset and a slot's snapshot act
on it as its declaration says (`openmoshi.modules.slots`), for the LM's GenState (with and without
classifier-free guidance, with and without per-slot random streams) and Mimi's encode and decode
states, which nest every other state class. A field declared without a batch axis fails, named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.model import LMModel
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.mimi.codec import Mimi, MimiDecodeState, MimiEncodeState
from openmoshi.mimi.config import mimi_config_from_dict
from openmoshi.mimi.conv import Conv1dState, ConvTr1dState
from openmoshi.mimi.seanet import SeanetState
from openmoshi.modules.slots import UNREAD, Declaration, SlotState, per_slot
from openmoshi.modules.transformer import TransformerState

from lm_utils import TINY_2B_LIKE, TINY_7B
from server_utils import TINY_MIMI_24K

B = 3  # slots
SRC, DST = 2, 0  # a move, and a snapshot taken from SRC and loaded into DST
MASK = [True, False, True]  # a reset
CONDITIONED = {**TINY_2B_LIKE, "fuser": {"sum": ["description"]}, "conditioners": {"description": {
    "type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop", "possible_values": ["good", "bad"]}}}}
STATE_CLASSES = {TransformerState, Conv1dState, ConvTr1dState, SeanetState, MimiEncodeState, MimiDecodeState,
                 G.GenState, G.Streams, G.Sampler, G.Guidance}
# The fields a reset leaves in place (unread until written again); a snapshot keeps their filled part.
UNREAD_FIELDS = {"TransformerState.keys", "TransformerState.values"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (LMModel(lm_config_from_dict(TINY_7B)).eval(), LMModel(lm_config_from_dict(CONDITIONED)).eval(),
            Mimi(mimi_config_from_dict(TINY_MIMI_24K), num_codebooks=8).eval())


KINDS = ("lm", "lm_one_generator", "lm_conditioned", "lm_guided", "mimi_encode", "mimi_decode")


def build(kind: str, models) -> SlotState:
    lm, conditioned, mimi = models
    if kind == "lm":
        return G.init_state(lm, B, slot_streams=True)
    if kind == "lm_one_generator":
        return G.init_state(lm, B)
    if kind == "lm_conditioned":
        return G.init_state(conditioned, B, slot_streams=True)
    if kind == "lm_guided":
        return G.init_state(conditioned, B, cfg_coef=3.0, slot_streams=True)
    return mimi.init_encode_state(B) if kind == "mimi_encode" else mimi.init_decode_state(B)


@dataclass
class Leaf:
    """One declared field's value (one entry of a list field), seen from the top-level state."""

    path: str  # e.g. GenState.temporal.keys[1]
    field: str  # Class.name, e.g. TransformerState.keys
    decl: Declaration
    value: Any  # a tensor, or a host or shared value
    per: int  # rows of this tensor per slot of the top-level state
    owner: SlotState
    scratch: bool  # inside a scratch state

    def rows(self, slot: int) -> slice:
        return slice(slot * self.per, (slot + 1) * self.per)

    @property
    def is_tensor(self) -> bool:
        return self.decl.kind == "tensor"

    @property
    def cleared(self) -> bool:
        """A reset writes its declared value."""
        return self.is_tensor and not self.scratch and self.decl.reset not in (None, UNREAD)

    @property
    def content(self) -> bool:
        """Part of a slot's snapshot."""
        return self.is_tensor and not self.scratch and self.decl.reset is not None


def leaves(state: SlotState, per: int = 1, path: str | None = None, scratch: bool = False) -> list[Leaf]:
    """Every declared field under `state`, depth first (declarations() raises on an undeclared one)."""
    path = path or type(state).__name__
    found, r = [], state.rows_per_slot
    for name, d in type(state).declarations():
        value = getattr(state, name)
        p = per * r if d.rows else per
        entries = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, x in entries:
            where = f"{path}.{name}" + ("" if i is None else f"[{i}]")
            if x is None:
                continue
            if d.kind in ("nested", "scratch"):
                found += leaves(x, p, where, scratch or d.kind == "scratch")
            else:
                found.append(Leaf(where, f"{type(state).__name__}.{name}", d, x, p, state, scratch))
    return found


def nested_states(state: SlotState) -> list[SlotState]:
    """`state` and every state nested in it."""
    found = [state]
    for name, d in type(state).declarations():
        value = getattr(state, name)
        if d.kind in ("nested", "scratch"):
            for x in value if isinstance(value, list) else [value]:
                found += [] if x is None else nested_states(x)
    return found


def tensors(state) -> list[Leaf]:
    return [leaf for leaf in leaves(state) if leaf.is_tensor]


def fill(state) -> None:
    """Distinct values everywhere (bool fields: True in the last slot only), none a reset value."""
    for leaf in tensors(state):
        t = leaf.value
        if t.dtype == torch.bool:
            last = torch.arange(t.shape[0]) // leaf.per == B - 1
            t.copy_(last.view((-1,) + (1,) * (t.dim() - 1)).expand_as(t))
        else:
            t.copy_((torch.arange(t.numel()) + 7).view(t.shape).to(t.dtype))


def clones(state) -> list[torch.Tensor]:
    return [leaf.value.clone() for leaf in tensors(state)]


def host_values(state) -> list:
    """Host values by value, shared objects by identity (tensors among them: their values too)."""
    return [(leaf.path, id(leaf.value) if leaf.decl.kind == "shared" else None,
             leaf.value.tolist() if isinstance(leaf.value, torch.Tensor) else repr(leaf.value))
            for leaf in leaves(state) if not leaf.is_tensor]


def test_every_state_class_declares_every_field(models):
    """The walk reaches every state class (each declaring all its fields, or it raises), and the
    only fields a reset leaves in place are the KV caches' keys and values."""
    states = [build(kind, models) for kind in KINDS]
    assert {type(s) for state in states for s in nested_states(state)} == STATE_CLASSES
    found = [leaf for state in states for leaf in leaves(state)]
    assert {leaf.field for leaf in found if leaf.decl.reset is UNREAD} == UNREAD_FIELDS, \
        "a new UNREAD field: teach the snapshot test what of it a snapshot keeps"


def test_a_field_without_a_declaration_is_named():
    @dataclass
    class Careless(SlotState):
        kept: torch.Tensor = per_slot()
        forgotten: torch.Tensor = None

    with pytest.raises(TypeError, match="Careless fields without a slot declaration .*: forgotten"):
        Careless.declarations()
    with pytest.raises(TypeError, match="forgotten"):
        Careless(torch.zeros(2), torch.zeros(2)).reset()


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_views_alias_the_state(kind, models):
    state = build(kind, models)
    fill(state)
    view = state.prefix(2)
    full, part = leaves(state), leaves(view)
    assert [leaf.path for leaf in full] == [leaf.path for leaf in part]
    for a, b in zip(full, part):
        if a.decl.kind == "shared":
            assert b.value is a.value, a.path
        elif a.decl.kind == "host":
            assert b.value == a.value, a.path
        else:  # the first two slots' rows of the very same memory
            assert a.value.shape[0] == B * a.per, f"{a.path}: dim 0 is not {a.per} row(s) per slot"
            assert b.value.shape[0] == 2 * a.per, a.path
            assert b.value.data_ptr() == a.value.data_ptr() and b.value.stride() == a.value.stride(), a.path
            assert torch.equal(b.value, a.value[:2 * a.per]), a.path


@pytest.mark.parametrize("kind", KINDS)
def test_move_copies_one_slot_and_nothing_else(kind, models):
    state = build(kind, models)
    fill(state)
    before, others = clones(state), host_values(state)
    state.move(SRC, DST)
    for leaf, old in zip(tensors(state), before):
        expected = old.clone()
        if not leaf.scratch:  # settings move too: the conversation keeps them in its new slot
            expected[leaf.rows(DST)] = old[leaf.rows(SRC)]
        assert torch.equal(leaf.value, expected), leaf.path
    assert host_values(state) == others


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask", [MASK, None])
def test_reset_clears_exactly_the_masked_slots_and_keeps_settings(kind, mask, models):
    state = build(kind, models)
    fill(state)
    before, others = clones(state), host_values(state)
    state.reset(None if mask is None else torch.tensor(mask))
    for leaf, old in zip(tensors(state), before):
        expected = old.clone()
        if leaf.cleared:
            for slot in range(B):
                if mask is None or mask[slot]:
                    expected[leaf.rows(slot)] = leaf.decl.reset
        assert torch.equal(leaf.value, expected), leaf.path
    assert host_values(state) == others


@pytest.mark.parametrize("kind", KINDS)
def test_a_snapshot_carries_a_conversation_but_not_its_settings(kind, models):
    """save_slot(SRC), then every slot reset (the snapshot is a copy), then load_slot(DST): DST's
    content is SRC's as it was (of the KV caches the filled part), its settings stay."""
    state = build(kind, models)
    fill(state)
    before = clones(state)
    snap = state.save_slot(SRC)
    state.reset()
    middle = clones(state)
    state.load_slot(DST, snap)
    for leaf, old, mid in zip(tensors(state), before, middle):
        expected = mid.clone()
        if leaf.content:
            src, dst = old[leaf.rows(SRC)], expected[leaf.rows(DST)]
            if leaf.decl.reset is UNREAD:  # a ring KV cache [rows, Hkv, S, Dh]: the slots filled so far
                n = min(int(leaf.owner.offset[leaf.rows(DST)].max()), leaf.owner.capacity)
                src, dst = src[:, :, :n], dst[:, :, :n]
            dst.copy_(src)
        assert torch.equal(leaf.value, expected), leaf.path
    assert 0 < snap.nbytes < state.nbytes


def test_a_snapshot_keeps_only_the_filled_part_of_the_kv_cache(models):
    lm = models[0]
    state = G.init_state(lm, 2, SamplingConfig.greedy())
    for _ in range(3):
        G.step(lm, state, torch.zeros(2, lm.cfg.num_user_codebooks, dtype=torch.long))
    snap = state.save_slot(1)
    assert state.temporal.capacity > 3
    assert [tuple(k.shape) for k in snap.temporal.keys] == [(1, k.shape[1], 3, k.shape[3]) for k in state.temporal.keys]
    assert snap.nbytes < state.nbytes / 2 / 4


@pytest.mark.parametrize("kind", KINDS)
def test_nbytes_counts_every_slot_tensor(kind, models):
    state = build(kind, models)
    slot_tensors = [leaf.value for leaf in tensors(state)]
    assert state.nbytes == sum(t.numel() * t.element_size() for t in slot_tensors)
    shared = [leaf.value for leaf in leaves(state) if leaf.decl.kind == "shared" and isinstance(leaf.value, torch.Tensor)]
    assert not {id(t) for t in shared} & {id(t) for t in slot_tensors}


def test_state_bytes_is_the_state_built_on_the_meta_device(models):
    lm, conditioned, _ = models
    for model, coef in ((lm, 1.0), (conditioned, 1.0), (conditioned, 3.0)):
        meta = G.init_state(model, B, cfg_coef=coef, slot_streams=True, device="meta")
        assert meta.streams.cache.is_meta and meta.temporal.keys[0].is_meta
        assert G.state_bytes(model, B, coef) == meta.nbytes == G.init_state(model, B, cfg_coef=coef,
                                                                             slot_streams=True).nbytes


def test_the_sampler_flags_are_one_object_for_a_state_and_its_prefixes(models):
    """set_sampling on the full state is what every prefix view's step reads."""
    lm = models[0]
    state = G.init_state(lm, B, SamplingConfig())
    view = state.prefix(1)
    G.set_sampling(state, SamplingConfig.greedy())
    assert view.sampler.flags.greedy_text and view.sampler.flags.greedy_audio
