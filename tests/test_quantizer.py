"""Split residual VQ: parity with the official quantizer on random codebooks, the centroid
formula, cache invalidation, codebook counts and error paths."""

import pytest
import torch

from openmoshi.mimi.config import QuantizerConfig
from openmoshi.mimi.quantizer import EPSILON, EuclideanCodebook, SplitResidualVectorQuantizer



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only: no autograd graphs (tests that need gradients enable them locally)."""
    with torch.no_grad():
        yield

CFG = QuantizerConfig()  # released layout: 32 x 2048 x 256, projections 512 <-> 256


def _random_codebooks(module, gen, scale=0.3):
    for name, m in module.named_modules():
        if name.endswith("_codebook"):
            bins, dim = m.embedding_sum.shape
            usage = 0.5 + torch.rand(bins, generator=gen)
            m.embedding_sum.copy_(scale * torch.randn(bins, dim, generator=gen) * usage[:, None])
            m.cluster_usage.copy_(usage)
            m._initialized.fill_(1.0)


@pytest.fixture(scope="module")
def pair():
    from moshi.models.loaders import _quantizer_kwargs
    from moshi.quantization import SplitResidualVectorQuantizer as Official

    torch.manual_seed(0)
    ref = Official(**_quantizer_kwargs).eval()
    _random_codebooks(ref, torch.Generator().manual_seed(1))
    ours = SplitResidualVectorQuantizer(CFG)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("k", [1, 2, 8, 32])
def test_matches_official(pair, k):
    ref, ours = pair
    ref.set_num_codebooks(k)
    ours.set_num_codebooks(k)
    torch.manual_seed(2)
    x = torch.randn(2, 512, 9)
    codes = ours.encode(x)
    ref_codes = ref.encode(x)
    assert codes.shape == (2, k, 9) and codes.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert len(codes.unique()) > min(9 * k, 40)  # varied, not all zeros
    out, ref_out = ours.decode(codes), ref.decode(codes)
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()


def test_decode_fewer_codebooks_than_encoded(pair):
    ref, ours = pair
    ours.set_num_codebooks(32)
    codes = ours.encode(torch.randn(1, 512, 4))
    for k in (1, 3, 32):
        torch.testing.assert_close(ours.decode(codes[:, :k]), ref.decode(codes[:, :k]),
                                   rtol=1e-5, atol=1e-6)


def test_centroid_formula_and_epsilon():
    book = EuclideanCodebook(dim=3, bins=4)
    book.embedding_sum.copy_(torch.arange(12.0).view(4, 3))
    book.cluster_usage.copy_(torch.tensor([2.0, 0.5, 0.0, 1e-9]))
    expected = torch.arange(12.0).view(4, 3) / torch.tensor([2.0, 0.5, EPSILON, EPSILON])[:, None]
    torch.testing.assert_close(book.embedding, expected)
    assert EPSILON == 1e-5


def test_centroid_cache_follows_updates():
    book = EuclideanCodebook(dim=2, bins=3)
    first = book.embedding.clone()
    book.embedding_sum.fill_(1.0)  # in place
    assert not torch.equal(book.embedding, first)
    sd = {k: v.clone() for k, v in book.state_dict().items()}
    sd["embedding_sum"].fill_(3.0)
    book.load_state_dict(sd)
    assert torch.equal(book.embedding, torch.full((3, 2), 3.0))
    book.double()
    assert book.embedding.dtype == torch.float64


def test_nearest_centroid():
    book = EuclideanCodebook(dim=2, bins=3)
    book.embedding_sum.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    codes = book.encode(torch.tensor([[0.9, 0.1], [0.1, 0.2], [-0.1, 0.8]]))
    assert codes.tolist() == [1, 0, 2]


def test_set_num_codebooks_errors():
    q = SplitResidualVectorQuantizer(CFG)
    for bad in (0, 33, -1, 2.0):
        with pytest.raises(ValueError, match="num_codebooks"):
            q.set_num_codebooks(bad)
    q.set_num_codebooks(1)
    assert q.encode(torch.randn(1, 512, 2)).shape == (1, 1, 2)


@pytest.mark.parametrize("codes,match", [
    (torch.full((1, 8, 2), -1), r"\[0, 2048\)"),
    (torch.full((1, 8, 2), 2048), r"\[0, 2048\)"),
    (torch.zeros(1, 33, 2, dtype=torch.long), "33 codebooks"),
    (torch.zeros(1, 0, 2, dtype=torch.long), "0 codebooks"),
    (torch.zeros(8, 2, dtype=torch.long), r"\[B, K, T\]"),
    (torch.zeros(1, 8, 2), "integers"),
])
def test_decode_errors(codes, match):
    q = SplitResidualVectorQuantizer(CFG)
    with pytest.raises(ValueError, match=match):
        q.decode(codes)
