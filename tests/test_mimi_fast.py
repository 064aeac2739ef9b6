"""The CPU fast path of Mimi (`openmoshi.accel.mimi_cpu.fast_cpu`) computes the same function as the
float32 reference: each `FastMatmul` mode against `F.linear`, then end to end on real espeak-ng
speech with the random official model of test_mimi.py: codes, decoded audio, whole signal."""

import pytest
import torch
import torch.nn.functional as F

from openmoshi.mimi.codec import FRAME_SIZE
from openmoshi.accel.mimi_cpu import WEIGHT_MODES, FastConvHolder, FastConvTrHolder, FastLinear, FastMatmul, fast_cpu
from official_utils import load_into_openmoshi, make_official_mimi, speech


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def snr_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (a - ref).pow(2).sum()).item()


@pytest.mark.parametrize("mode, tol", [("fp32", 1e-6), ("bf16", 1e-2), ("int8", 2e-2)])
@pytest.mark.parametrize("rows", [1, 2, 40])  # 40: more than FEW_ROWS, the F.linear branch
def test_fast_matmul_matches_linear(mode, tol, rows):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) / 8
    b = torch.randn(96, generator=gen)
    x = torch.randn(3, rows, 64, generator=gen)
    ref = F.linear(x, w, b)
    y = FastMatmul(w, mode, b)(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < tol
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major like a conv's
    assert rel_err(FastMatmul(w, mode)(xt), F.linear(x, w)) < tol


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="weight mode"):
        FastMatmul(torch.zeros(4, 4), "fp8")
    with pytest.raises(ValueError, match="weight mode"):
        fast_cpu(torch.nn.Module(), encode="int4")


@pytest.fixture(scope="module")
def ref():
    return load_into_openmoshi(make_official_mimi(0, n_q=8), num_codebooks=8)


@pytest.fixture(scope="module")
def pcm():
    x = speech(3.0)
    return x[: x.shape[0] // FRAME_SIZE * FRAME_SIZE][None, None]  # [1, 1, 37 frames]


def _stream(mimi, pcm, codes_for_decode=None):
    B = pcm.shape[0]
    enc, dec = mimi.init_encode_state(B), mimi.init_decode_state(B)
    codes = torch.cat([mimi.encode_step(c, enc) for c in pcm.split(FRAME_SIZE, dim=-1)], dim=-1)
    src = codes if codes_for_decode is None else codes_for_decode
    audio = torch.cat([mimi.decode_step(c, dec) for c in src.split(1, dim=-1)], dim=-1)
    return codes, audio


@pytest.fixture(scope="module")
def ref_stream(ref, pcm):
    return _stream(ref, pcm)


def test_fast_cpu_swaps_the_big_matmuls_and_leaves_the_reference_alone(ref):
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    fast = fast_cpu(ref, encode="fp32", decode="bf16")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, (FastLinear, FastConvHolder, FastConvTrHolder)) for m in ref.modules())
    kinds = {}
    for m in fast.modules():
        if isinstance(m, FastMatmul):
            kinds[m.mode] = kinds.get(m.mode, 0) + 1
    # 8 layers x 4 linears per transformer, plus the deep convs of each side
    assert kinds["fp32"] > 32 and kinds["bf16"] > 32, kinds
    assert not fast.training


def test_default_fast_path_keeps_codes_and_audio(ref, pcm, ref_stream):
    """Default: the float32 weights re-laid out, so only the order of the sums changes."""
    codes_ref, audio_ref = ref_stream
    codes, audio = _stream(fast_cpu(ref), pcm)
    assert (codes == codes_ref).float().mean().item() >= 0.99
    if torch.equal(codes, codes_ref):  # the usual case; a near tie may flip one code
        assert snr_db(audio, audio_ref) > 100  # float32 rounding


def test_fast_decoder_with_int8_weights_is_close(ref, pcm, ref_stream):
    """The fastest setting for audio output: float32 encoder, int8 decoder weights."""
    codes_ref, audio_ref = ref_stream
    codes, audio = _stream(fast_cpu(ref, encode="fp32", decode="int8"), pcm, codes_ref)
    assert (codes == codes_ref).float().mean().item() >= 0.99
    assert snr_db(audio, audio_ref) > 50


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_low_precision_encoder_is_close_before_quantization(ref, pcm, mode):
    """The codes of this random model are near ties (median gap between the two nearest centroids
    ~0.3% of the distance), so a 16- or 8-bit encoder flips some; its latent must stay close."""
    fast = fast_cpu(ref, encode=mode, decode=mode)
    lat = []
    for m in (ref, fast):
        enc = m.init_encode_state(1)
        out = []
        for c in pcm.split(FRAME_SIZE, dim=-1):
            e = m.encoder.step(c, enc.encoder)
            e = m.encoder_transformer(e, enc.transformer)
            out.append(m.downsample.conv.step(e, enc.downsample))
        lat.append(torch.cat(out, dim=-1))
    # relative to how much the latent moves over time (its mean is a large constant offset)
    err = (lat[1] - lat[0]).norm() / (lat[0] - lat[0].mean(-1, keepdim=True)).norm()
    assert err.item() < (0.1 if mode == "bf16" else 0.2)


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_decoder_modes_audio_close(ref, pcm, ref_stream, mode):
    codes_ref, audio_ref = ref_stream
    _, audio = _stream(fast_cpu(ref, encode="fp32", decode=mode), pcm, codes_ref)
    assert snr_db(audio, audio_ref) > (100 if mode == "fp32" else 40)


def test_fast_copy_streams_batches_and_whole_signal(ref, pcm, ref_stream):
    """Batch slots stay independent, and whole-signal encode/decode of the copy still work."""
    fast = fast_cpu(ref)
    codes_ref, audio_ref = ref_stream
    two = torch.cat([pcm, 0.5 * pcm], dim=0)
    codes, audio = _stream(fast, two, codes_ref.expand(2, -1, -1))
    assert (codes[0] == codes_ref[0]).float().mean().item() >= 0.99
    assert torch.allclose(audio[0], audio[1])
    whole = fast.encode(pcm)
    assert (whole == ref.encode(pcm)).float().mean().item() >= 0.99
    assert snr_db(fast.decode(codes_ref), ref.decode(codes_ref)) > 50


def test_bench_mimi_fast_option(tmp_path):
    import json

    from openmoshi.engine.speed import parse_mimi_fast
    from openmoshi.cli.main import main

    cpu = torch.device("cpu")
    assert parse_mimi_fast(None, cpu) == "auto"  # measured on the machine (engine.autotune)
    assert parse_mimi_fast(None, torch.device("cuda")) is None
    assert parse_mimi_fast("off", cpu) is None
    assert parse_mimi_fast("fp32,int8", cpu) == ("fp32", "int8")
    for bad in ("bf16", "fp32,fp8", "fp32,bf16,int8"):
        with pytest.raises(ValueError, match="--mimi-fast"):
            parse_mimi_fast(bad, cpu)
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--codec-only", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--mimi-fast", "fp32,int8", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mimi_fast"] == ["fp32", "int8"]
    with pytest.raises(SystemExit) as e:
        main(["bench", "--config", "tiny", "--codec-only", "--device", "cpu", "--mimi-fast", "bf16"])
    assert e.value.code != 0
