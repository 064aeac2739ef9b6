"""Forced tokens in the generation step (issue 13), on a plain Moshi checkpoint: the official
package's teacher-forced training pass is the oracle."""

import pytest
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig

from lm_utils import CONFIGS, make_official_lm, ours_from_official


def forced_schedule(cfg, B: int, T: int, p: float, seed: int) -> torch.Tensor:
    """[B, 1 + gen_q, T]: at step s, random tokens of frame s + 1 on a random ~p of the streams."""
    g = torch.Generator().manual_seed(seed)
    forced = torch.randint(0, cfg.card, (B, 1 + cfg.gen_q, T), generator=g)
    forced[:, 0] = torch.randint(0, cfg.text_card, (B, T), generator=g)
    forced[torch.rand(forced.shape, generator=g) >= p] = G.NOT_FORCED
    return forced


def test_forced_frames_equal_official_teacher_forcing():
    """Greedy generation with random tokens forced on every kind of stream (text, the undelayed
    semantic codebook, delayed acoustic ones), different per row and per frame: every forced
    token is in its frame, and every token the step sampled is the official model's argmax when
    the whole conversation (user codes, forced and sampled tokens) is teacher-forced through its
    training pass. A forced token the depth transformer or the cache did not see would change the
    official argmax of the codebooks and frames after it."""
    kw = CONFIGS["tiny_7b"]
    official = make_official_lm(kw, seed=11)
    ours = ours_from_official(official, kw)
    cfg = ours.cfg
    B, T = 2, 16
    user = torch.randint(0, cfg.card, (B, cfg.num_user_codebooks, T + 1), generator=torch.Generator().manual_seed(12))
    forced = forced_schedule(cfg, B, T, 0.3, seed=13)
    assert not torch.equal(forced[0], forced[1])
    state = G.init_state(ours, B, SamplingConfig.greedy())
    frames = []  # our frames 1..T: step s returns frame s
    for s in range(T + 1):
        out = G.step(ours, state, user[:, :, s], forced=forced[:, :, s] if s < T else None)
        assert bool(out.valid.all()) == (s >= 1)
        if s >= 1:
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1))
    ours_codes = torch.stack(frames, dim=-1)  # [B, 1 + Q, T], frames 1..T

    # Forced tokens are there, in their frame: forced[..., s] is frame s + 1.
    given = forced != G.NOT_FORCED
    assert given.sum() > 30
    assert torch.equal(ours_codes[given], forced[given])

    # The official step 0 reads only initial tokens and the official forward prepends them: its
    # frame j is our frame j + 1 (the streaming step's frame 0 is never read).
    codes = torch.cat([ours_codes, user[:, :, 1:]], dim=1)  # [B, 17, T]
    with torch.no_grad():
        ref = official(codes)
    checked = 0
    for logits, mask, targets, free in ((ref.text_logits, ref.text_mask, codes[:, :1], ~given[:, :1]),
                                        (ref.logits, ref.mask, codes[:, 1:1 + cfg.gen_q], ~given[:, 1:])):
        sel = mask & free
        assert torch.equal(logits.argmax(-1)[sel], targets[sel])
        checked += int(sel.sum())
    assert checked > 150
    assert len(ours_codes[:, 0].unique()) > 5, "degenerate test: text tokens are not varied"


def test_forced_tokens_wait_for_their_step_and_skip_idle_slots():
    """A delayed stream's forced token is used one step later, a reset drops the waiting ones, and
    an idle slot stores none."""
    kw = CONFIGS["tiny_7b"]
    ours = ours_from_official(make_official_lm(kw, seed=14), kw)
    cfg = ours.cfg
    user = torch.zeros(2, cfg.num_user_codebooks, dtype=torch.long)
    forced = torch.full((2, 1 + cfg.gen_q), G.NOT_FORCED)
    forced[:, 2] = 7  # an acoustic codebook (delay 1)
    state = G.init_state(ours, 2, SamplingConfig.greedy())
    for _ in range(3):
        G.step(ours, state, user)
    G.step(ours, state, user, active=torch.tensor([True, False]), forced=forced)
    assert (state.streams.forced[0] != G.NOT_FORCED).sum() == 1 and (state.streams.forced[1] == G.NOT_FORCED).all()
    out = G.step(ours, state, user)  # slot 0: frame 4's acoustic codebook is produced now, and returned
    assert (state.streams.forced == G.NOT_FORCED).all()
    assert out.audio[0, 1] == 7 and out.audio[1, 1] != 7
    G.step(ours, state, user, forced=forced)
    state.reset(torch.tensor([True, False]))
    assert (state.streams.forced[0] == G.NOT_FORCED).all() and (state.streams.forced[1] != G.NOT_FORCED).sum() == 1


def test_bad_forced_tokens():
    kw = CONFIGS["tiny_7b"]
    ours = ours_from_official(make_official_lm(kw, seed=15), kw)
    state = G.init_state(ours, 2)
    user = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="shape \\[2, 9\\]"):
        G.step(ours, state, user, forced=torch.zeros(2, 17, dtype=torch.long))
    bad = torch.full((2, 9), G.NOT_FORCED)
    bad[1, 0] = 100  # text_card is 100
    with pytest.raises(ValueError, match="forced\\[1, 0\\] = 100"):
        G.step(ours, state, user, forced=bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_graphed_step_forces_like_the_eager_step(device):
    """`GraphedStep` (captured CUDA graphs on a GPU; on CPU the static input buffers they replay
    from, eagerly) with forced tokens and input embeddings gives the eager step's tokens, and
    switches between steps with and without them."""
    from openmoshi.accel.cuda_graph import GraphedStep

    kw = CONFIGS["tiny_7b"]
    ours = ours_from_official(make_official_lm(kw, seed=16), kw).to(device)
    cfg = ours.cfg
    B, T = 2, 10
    user = torch.randint(0, cfg.card, (B, 8, T), generator=torch.Generator().manual_seed(17)).to(device)
    forced = forced_schedule(cfg, B, T, 0.4, seed=18).to(device)
    emb = torch.randn(T, B, 1, cfg.dim, generator=torch.Generator().manual_seed(19)).to(device)
    use = torch.tensor([True, False], device=device)
    outs = []
    for graphed in (False, True):
        state = G.init_state(ours, B, SamplingConfig(temp=0.8, temp_text=0.7), slot_streams=True)
        G.set_seeds(state, 1, 2)
        step = GraphedStep(ours, state, cuda_graph=True) if graphed else None
        frames = []
        for s in range(T):
            f = forced[:, :, s] if s % 3 else None  # steps without forcing in between
            e = (emb[s], use) if s < 4 else None
            if graphed:
                out = step(user[:, :, s], position=s, forced=f, embeddings=e)
            else:
                out = G.step(ours, state, user[:, :, s], forced=f, embeddings=e)
            frames.append(torch.cat([out.text[:, None], out.audio], dim=1).clone())
        outs.append(torch.stack(frames))
    assert torch.equal(outs[0], outs[1])
