"""Repetition penalty and padding bias on the text stream (the web UI's settings), per slot:
the batched, sync-free shaping equals a plain per-token reference, and a step samples from it."""

import pytest
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.sampling import TEXT_HISTORY, SamplingConfig, push_text_history, shape_text_logits
from openmoshi.serving.server import sampling_from_query

from lm_utils import tiny_lm

PAD, END_PAD = 3, 0


def reference(logits: list[float], tokens: list[int], penalty: float, context: int, pad_mult: float) -> list[float]:
    """One slot, written the plain way: the last `context` non-padding tokens, each distinct one
    divided (or, when negative, multiplied) by the penalty once; the pad logit plus pad_mult."""
    kept = [t for t in tokens if t not in (PAD, END_PAD)]
    recent = set(kept[max(0, len(kept) - context):])
    out = [(x / penalty if x >= 0 else x * penalty) if i in recent else x for i, x in enumerate(logits)]
    out[PAD] += pad_mult
    return out


def test_shaping_equals_the_plain_reference_across_ring_wraps():
    torch.manual_seed(0)
    B, N = 4, 40
    history = torch.full((B, TEXT_HISTORY), -1, dtype=torch.long)
    count = torch.zeros(B, dtype=torch.long)
    penalty = torch.tensor([1.0, 1.3, 2.0, 0.7])
    context = torch.tensor([64, 5, TEXT_HISTORY, 0])
    pad_mult = torch.tensor([0.0, -2.0, 1.5, 0.0])
    emitted = [[] for _ in range(B)]
    for t in range(TEXT_HISTORY * 2 + 37):  # the ring wraps twice
        tokens = torch.randint(0, N, (B,))
        tokens[t % B] = PAD if t % 3 else END_PAD  # padding is never remembered
        active = torch.tensor([True, True, t % 5 != 0, True])
        push_text_history(history, count, tokens, (PAD, END_PAD), active)
        for b in range(B):
            if active[b]:
                emitted[b].append(int(tokens[b]))
        if t % 50 == 0 or t > TEXT_HISTORY * 2:
            logits = torch.randn(B, N) * 3
            got = shape_text_logits(logits, history, count, penalty, context, pad_mult, PAD)
            for b in range(B):
                want = torch.tensor(reference(logits[b].tolist(), emitted[b], float(penalty[b]), int(context[b]),
                                              float(pad_mult[b])))
                torch.testing.assert_close(got[b], want, rtol=0, atol=1e-6)
    assert count.tolist() == [sum(t not in (PAD, END_PAD) for t in e) for e in emitted]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def run(lm, sampling: list[SamplingConfig], user: torch.Tensor, record: list | None = None):
    """Greedy text through `step` with per-slot settings; the text sampled at each step [T, B]."""
    B = len(sampling)
    state = G.init_state(lm, B, SamplingConfig.greedy())
    for b, s in enumerate(sampling):
        mask = torch.arange(B) == b
        G.set_sampling(state, s, mask)
    texts = []
    original = lm.forward_text

    def observed(*args, **kwargs):  # records the logits the model produced, changes nothing
        hidden, logits = original(*args, **kwargs)
        if record is not None:
            record.append(logits[:, 0].float().clone())
        return hidden, logits

    lm.forward_text = observed
    try:
        with torch.no_grad():
            for t in range(user.shape[2]):
                G.step(lm, state, user[:, :, t])
                texts.append(state.streams.cache[:, 0, state.streams.offset[0] % state.streams.cache.shape[2]].clone())
    finally:
        del lm.forward_text
    return torch.stack(texts)


def test_a_step_samples_from_the_shaped_logits_per_slot(lm):
    torch.manual_seed(1)
    user = torch.randint(0, 64, (2, 8, 60))
    shaped = SamplingConfig(temp=0.0, temp_text=0.0, repetition_penalty=4.0, repetition_context=8, pad_mult=-1.0)
    plain = SamplingConfig.greedy()
    record: list = []
    texts = run(lm, [shaped, plain], user, record)
    # Slot 0: each greedy token is the argmax of the reference shaping of the model's logits.
    for t in range(texts.shape[0]):
        want = reference(record[t][0].tolist(), texts[:t, 0].tolist(), 4.0, 8, -1.0)
        assert int(texts[t, 0]) == max(range(len(want)), key=want.__getitem__), t
    # Slot 1 (no shaping) equals its conversation alone, and the shaping did change slot 0.
    alone = run(lm, [plain], user[1:])
    assert torch.equal(texts[:, 1], alone[:, 0])
    unshaped = run(lm, [plain], user[:1])
    assert not torch.equal(texts[:, 0], unshaped[:, 0])


def test_a_large_pad_bias_makes_the_text_all_padding(lm):
    user = torch.randint(0, 64, (1, 8, 20))
    texts = run(lm, [SamplingConfig(temp=0.0, temp_text=0.0, pad_mult=1e4)], user)
    assert (texts == PAD).all()


def test_query_settings_reach_the_sampler():
    default = SamplingConfig()
    got = sampling_from_query({"repetition_penalty": "1.25", "repetition_penalty_context": "32", "pad_mult": "-0.5"},
                              default)
    assert (got.repetition_penalty, got.repetition_context, got.pad_mult) == (1.25, 32, -0.5)
    assert got.shapes_text and not default.shapes_text
    for bad, match in (({"repetition_penalty": "0"}, "repetition_penalty must be > 0"),
                       ({"repetition_penalty_context": "100000"}, "repetition_context must be in"),
                       ({"pad_mult": "inf"}, "must be finite"), ({"repetition_penalty": "x"}, "not a number")):
        with pytest.raises(ValueError, match=match):
            sampling_from_query(bad, default)
