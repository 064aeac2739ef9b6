"""Causal streaming convolutions: parity with the official modules, streaming == whole signal,
causality, per-slot reset, error paths."""

import itertools

import pytest
import torch

from openmoshi.mimi.conv import StreamingConv1d, StreamingConvTranspose1d



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only: no autograd graphs (tests that need gradients enable them locally)."""
    with torch.no_grad():
        yield

CONV_CASES = [  # kernel, stride, dilation, pad_mode
    (7, 1, 1, "constant"), (3, 1, 2, "constant"), (1, 1, 1, "constant"), (8, 4, 1, "constant"),
    (10, 5, 1, "constant"), (4, 2, 1, "replicate"), (16, 8, 1, "constant"), (5, 3, 1, "replicate"),
]


def _stream(module, x, chunk_lengths, state):
    outs, pos, i = [], 0, 0
    while pos < x.shape[-1]:
        n = chunk_lengths[i % len(chunk_lengths)]
        outs.append(module.step(x[..., pos:pos + n], state))
        pos, i = pos + n, i + 1
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("kernel,stride,dilation,pad_mode", CONV_CASES)
def test_conv_matches_official(kernel, stride, dilation, pad_mode):
    from moshi.modules.conv import StreamingConv1d as Official

    torch.manual_seed(0)
    ref = Official(3, 5, kernel, stride, dilation=dilation, causal=True, pad_mode=pad_mode)
    ours = StreamingConv1d(3, 5, kernel, stride, dilation=dilation, pad_mode=pad_mode)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 12 * stride)
    expected = ref(x)
    assert torch.equal(ours(x), expected)
    with ref.streaming(2):
        ref_stream = torch.cat([ref(c) for c in x.split(2 * stride, dim=-1)], dim=-1)
    ours_stream = _stream(ours, x, [2 * stride], ours.init_state(2))
    torch.testing.assert_close(ours_stream, ref_stream, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation,pad_mode", CONV_CASES)
def test_conv_streaming_any_chunk_equals_whole(kernel, stride, dilation, pad_mode):
    torch.manual_seed(1)
    conv = StreamingConv1d(3, 4, kernel, stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(2, 3, 10 * stride + stride - 1)  # ends on an incomplete stride
    whole = conv(x)
    assert whole.shape[-1] == x.shape[-1] // stride
    for chunks in ([1], [2], [3], [stride], [1, 2 * stride + 1, 5], [x.shape[-1]]):
        streamed = _stream(conv, x, chunks, conv.init_state(2))
        torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(8, 4), (4, 2), (16, 8), (3, 1), (2, 2), (7, 2)])
def test_convtr_matches_official_and_streams(kernel, stride):
    from moshi.modules.conv import StreamingConvTranspose1d as Official

    torch.manual_seed(2)
    ref = Official(4, 3, kernel, stride, causal=True)
    ours = StreamingConvTranspose1d(4, 3, kernel, stride)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 11)
    whole = ours(x)
    assert whole.shape == (2, 3, 11 * stride)
    torch.testing.assert_close(whole, ref(x), rtol=0, atol=1e-6)  # overlap-add: rounding only
    with ref.streaming(2):
        ref_stream = torch.cat([ref(c) for c in x.split(1, dim=-1)], dim=-1)
    for chunks in ([1], [2], [3], [1, 4, 2]):
        streamed = _stream(ours, x, chunks, ours.init_state(2))
        torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(_stream(ours, x, [1], ours.init_state(2)), ref_stream,
                               rtol=0, atol=1e-6)


def test_depthwise_convtr_without_bias():
    torch.manual_seed(3)
    convtr = StreamingConvTranspose1d(6, 6, 4, 2, groups=6, bias=False)
    x = torch.randn(1, 6, 9)
    streamed = _stream(convtr, x, [1, 2, 3], convtr.init_state(1))
    torch.testing.assert_close(streamed, convtr(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_conv_is_causal(pad_mode):
    torch.manual_seed(4)
    conv = StreamingConv1d(2, 3, 6, 2, pad_mode=pad_mode)
    convtr = StreamingConvTranspose1d(3, 2, 6, 2)
    x = torch.randn(1, 2, 40)
    y, z = conv(x), convtr(conv(x))
    x2 = x.clone()
    x2[..., 20:] = torch.randn(1, 2, 20)
    y2, z2 = conv(x2), convtr(conv(x2))
    # Output step t of the conv covers samples up to 2t + 1, so steps < 10 never see sample 20.
    assert torch.equal(y[..., :10], y2[..., :10]) and not torch.equal(y, y2)
    assert torch.equal(z[..., :20], z2[..., :20])


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_reset_one_slot(pad_mode):
    torch.manual_seed(5)
    conv = StreamingConv1d(2, 3, 4, 2, pad_mode=pad_mode)
    convtr = StreamingConvTranspose1d(3, 2, 4, 2)
    a, b = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    cs, ts = conv.init_state(2), convtr.init_state(2)
    for chunk in a.split(4, dim=-1):
        convtr.step(conv.step(chunk, cs), ts)
    mask = torch.tensor([True, False])
    cs.reset(mask)
    ts.reset(mask)
    out = torch.cat([convtr.step(conv.step(c, cs), ts) for c in b.split(4, dim=-1)], dim=-1)
    # Slot 0 restarted: same as a fresh run on b. Slot 1 continued: same as the run on a ++ b.
    torch.testing.assert_close(out[0], convtr(conv(b[:1]))[0], rtol=0, atol=1e-6)
    full = convtr(conv(torch.cat([a[1:], b[1:]], dim=-1)))
    torch.testing.assert_close(out[1], full[0, :, -16:], rtol=0, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="pad_mode"):
        StreamingConv1d(1, 1, 3, pad_mode="reflect")
    with pytest.raises(ValueError, match="stride"):
        StreamingConv1d(1, 1, 2, stride=3)
    with pytest.raises(ValueError, match="stride"):
        StreamingConvTranspose1d(1, 1, 2, stride=3)


def test_empty_and_short_inputs():
    conv = StreamingConv1d(1, 2, 4, 2)
    assert conv(torch.randn(1, 1, 1)).shape == (1, 2, 0)
    state = conv.init_state(1)
    assert conv.step(torch.randn(1, 1, 0), state).shape == (1, 2, 0)
    assert conv.step(torch.randn(1, 1, 1), state).shape == (1, 2, 0)
    assert conv.step(torch.randn(1, 1, 1), state).shape == (1, 2, 1)


def test_all_small_configs_stream():
    torch.manual_seed(6)
    for kernel, stride in itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 4]):
        if stride > kernel:
            continue
        conv = StreamingConv1d(2, 2, kernel, stride)
        convtr = StreamingConvTranspose1d(2, 2, kernel, stride)
        x = torch.randn(1, 2, 8 * stride)
        streamed = _stream(conv, x, [1, 3], conv.init_state(1))
        torch.testing.assert_close(streamed, conv(x), rtol=0, atol=1e-5)
        y = torch.randn(1, 2, 7)
        streamed = _stream(convtr, y, [1, 2], convtr.init_state(1))
        torch.testing.assert_close(streamed, convtr(y), rtol=0, atol=1e-5)
