"""SEANet encoder/decoder: parity with the official modules, streaming == whole, causality."""

import pytest
import torch

from openmoshi.mimi.config import SeanetConfig
from openmoshi.mimi.seanet import SeanetDecoder, SeanetEncoder



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only: no autograd graphs (tests that need gradients enable them locally)."""
    with torch.no_grad():
        yield

TINY = SeanetConfig(dimension=16, n_filters=4, ratios=(4, 3, 2))  # hop 24


@pytest.fixture(scope="module")
def official_pair():
    from moshi.models.loaders import _seanet_kwargs
    from moshi.modules.seanet import SEANetDecoder, SEANetEncoder

    torch.manual_seed(0)
    return SEANetEncoder(**_seanet_kwargs).eval(), SEANetDecoder(**_seanet_kwargs).eval()


@pytest.fixture(scope="module")
def ours_pair(official_pair):
    """Our encoder and decoder holding the official pair's weights, loaded strictly."""
    ref_enc, ref_dec = official_pair
    enc, dec = SeanetEncoder(SeanetConfig()), SeanetDecoder(SeanetConfig())
    enc.load_state_dict(ref_enc.state_dict(), strict=True)
    dec.load_state_dict(ref_dec.state_dict(), strict=True)
    return enc, dec


def test_default_config_matches_official(official_pair, ours_pair):
    ref_enc, ref_dec = official_pair
    enc, dec = ours_pair
    torch.manual_seed(1)
    x = 0.1 * torch.randn(1, 1, 3 * 960)
    z = enc(x)
    assert z.shape == (1, 512, 3)
    torch.testing.assert_close(z, ref_enc(x), rtol=0, atol=1e-6)
    z = torch.randn(1, 512, 3)
    y = dec(z)
    assert y.shape == (1, 1, 3 * 960)
    torch.testing.assert_close(y, ref_dec(z), rtol=0, atol=1e-6)


def test_default_streaming_matches_official(official_pair, ours_pair):
    ref_enc, ref_dec = official_pair
    enc, dec = ours_pair
    torch.manual_seed(2)
    x = 0.1 * torch.randn(1, 1, 4 * 960)
    with ref_enc.streaming(1):
        ref_z = torch.cat([ref_enc(c) for c in x.split(960, dim=-1)], dim=-1)
    es = enc.init_state(1)
    z = torch.cat([enc.step(c, es) for c in x.split(960, dim=-1)], dim=-1)
    torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-6)
    with ref_dec.streaming(1):
        ref_y = torch.cat([ref_dec(c) for c in z.split(1, dim=-1)], dim=-1)
    ds = dec.init_state(1)
    y = torch.cat([dec.step(c, ds) for c in z.split(1, dim=-1)], dim=-1)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames_per_call", [1, 2, 3])
def test_streaming_equals_whole(frames_per_call):
    torch.manual_seed(3)
    enc, dec = SeanetEncoder(TINY), SeanetDecoder(TINY)
    hop = TINY.hop_length
    x = torch.randn(2, 1, 12 * hop)
    z = enc(x)
    es = enc.init_state(2)
    z_stream = torch.cat([enc.step(c, es) for c in x.split(frames_per_call * hop, dim=-1)], -1)
    torch.testing.assert_close(z_stream, z, rtol=0, atol=1e-5)
    y = dec(z)
    ds = dec.init_state(2)
    y_stream = torch.cat([dec.step(c, ds) for c in z.split(frames_per_call, dim=-1)], -1)
    torch.testing.assert_close(y_stream, y, rtol=0, atol=1e-5)


def test_encoder_streams_odd_chunks():
    """Chunks that do not align with the hop still give the whole-signal output."""
    torch.manual_seed(4)
    enc = SeanetEncoder(TINY)
    x = torch.randn(1, 1, 10 * TINY.hop_length)
    es = enc.init_state(1)
    chunks = x.split(17, dim=-1)
    z_stream = torch.cat([enc.step(c, es) for c in chunks], -1)
    torch.testing.assert_close(z_stream, enc(x), rtol=0, atol=1e-5)


def test_causal():
    torch.manual_seed(5)
    enc, dec = SeanetEncoder(TINY), SeanetDecoder(TINY)
    hop = TINY.hop_length
    x = torch.randn(1, 1, 10 * hop)
    x2 = x.clone()
    x2[..., 6 * hop:] += torch.randn(1, 1, 4 * hop)
    z, z2 = enc(x), enc(x2)
    assert torch.equal(z[..., :6], z2[..., :6]) and not torch.equal(z, z2)
    y, y2 = dec(z), dec(z2)
    assert torch.equal(y[..., :6 * hop], y2[..., :6 * hop])


def test_reset_one_slot():
    torch.manual_seed(6)
    enc = SeanetEncoder(TINY)
    hop = TINY.hop_length
    a, b = torch.randn(2, 1, 4 * hop), torch.randn(2, 1, 5 * hop)
    es = enc.init_state(2)
    enc.step(a, es)
    es.reset(torch.tensor([False, True]))
    z = torch.cat([enc.step(c, es) for c in b.split(hop, dim=-1)], -1)
    torch.testing.assert_close(z[1], enc(b[1:])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(z[0], enc(torch.cat([a[:1], b[:1]], -1))[0, :, 4:], rtol=0, atol=1e-5)
