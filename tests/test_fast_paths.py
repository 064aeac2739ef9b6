"""Fast paths compute the same function as the eager reference: quantized linears, the static-buffer
(CUDA-graph style) step, and the benchmark loop."""

import pytest
import torch

from openmoshi.lm import generate as G
from openmoshi.lm.config import TINY, lm_config_from_dict
from openmoshi.accel.cuda_graph import CUDAGraphed
from openmoshi.lm.model import LMModel
from openmoshi.accel.quantize import QuantizedLinear, dequantize_int4, quantize_int4, quantize_int8, quantize_lm
from openmoshi.loading.formats.quantized import quantization_of, save_quantized_lm
from openmoshi.lm.sampling import SamplingConfig

from lm_utils import TINY_7B


def random_lm(kw=TINY_7B, seed=0):
    torch.manual_seed(seed)
    lm = LMModel(lm_config_from_dict(kw)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.2)
    return lm


def test_int8_round_trip_error_is_small():
    w = torch.randn(64, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs().max(dim=1).values
    assert (err <= scale / 2 + 1e-6).all()  # rounding error at most half a step


def test_int4_round_trip_error_is_small():
    w = torch.randn(32, 256)
    packed, scale, offset = quantize_int4(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 128) and scale.shape == (32, 4)
    back = dequantize_int4(packed, scale, offset, torch.float32)
    step = scale.repeat_interleave(64, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matmul_equals_dequantized_matmul(mode):
    w = torch.randn(3 * 48, 128)  # three stacked weight sets
    ql = QuantizedLinear.from_weight(w, mode, num_sets=3, group_size=32)
    ql.dtype = torch.float32
    x = torch.randn(2, 5, 128)
    for i in range(3):
        ref = torch.nn.functional.linear(x, ql.weight(i))
        torch.testing.assert_close(ql(x, i), ref)
        assert (ql.weight(i) - w[48 * i:48 * (i + 1)]).abs().max() < (0.05 if mode == "int8" else 0.6)
    if mode == "int8":  # torch's CPU int8 kernel agrees with the dequantized reference
        y = torch._weight_int8pack_mm(x.view(-1, 128), ql.qweight[:48], ql.scale[:48])
        torch.testing.assert_close(y.view(2, 5, 48), torch.nn.functional.linear(x, ql.weight(0)), rtol=1e-4, atol=1e-3)


def test_int4_tinygemm_cpu_kernel_matches_reference():
    """The tinygemm scale/zero convention ((q - 8) * scale + zero, [G, out, 2]) is ours: checked on
    the CPU port of the kernel that the CUDA path uses."""
    w = torch.randn(2 * 64, 256)
    ql = QuantizedLinear.from_weight(w, "int4", num_sets=2, group_size=128)
    ql.dtype = torch.bfloat16
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for i in range(2):
        ref = torch.nn.functional.linear(x.float(), ql.weight(i).float())
        y = ql(x, i).float()
        assert ((y - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_lm_quality_and_save_load(mode, tmp_path):
    kw = {**TINY_7B, "dim": 128, "num_heads": 4, "depformer_dim": 64, "depformer_dim_feedforward": 256}
    ref = random_lm(kw)
    ref.float()
    q = random_lm(kw)
    quantize_lm(q, mode, group_size=32)
    codes = torch.randint(0, 64, (2, 17, 20))
    codes[:, 0] = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        a, b = ref(codes), q(codes)
    for la, lb, m in ((a.logits, b.logits, a.mask), (a.text_logits, b.text_logits, a.text_mask)):
        la, lb = la[m], lb[m]
        agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True, reduction="batchmean")
        assert agree > (0.9 if mode == "int8" else 0.6), agree
        assert kl < (0.05 if mode == "int8" else 0.5), kl.item()
    save_quantized_lm(q, tmp_path / "q.safetensors")
    assert quantization_of(tmp_path / "q.safetensors") == (mode, 32)
    from openmoshi.loading.lm import load_lm
    loaded = load_lm(tmp_path / "q.safetensors", lm_config_from_dict(kw), dtype=torch.float32)
    with torch.no_grad():
        c = loaded(codes)
    torch.testing.assert_close(c.logits, b.logits, equal_nan=True)


def test_static_buffer_step_equals_eager_step():
    """The CUDA-graph discipline (inputs copied into fixed buffers, outputs returned through fixed
    buffers, state mutated in place) gives the same tokens as the eager step."""
    lm = random_lm()
    user = torch.randint(0, 64, (2, 8, 25))
    eager_state = G.init_state(lm, 2, SamplingConfig.greedy())
    static_state = G.init_state(lm, 2, SamplingConfig.greedy())

    def fn(codes, attend):
        out = G.step(lm, static_state, codes, check=False, attend=attend)
        return out.text, out.audio, out.valid

    graphed = CUDAGraphed(fn, enabled=False, static=True)
    first = None
    for t in range(25):
        ref = G.step(lm, eager_state, user[:, :, t])
        text, audio, valid = graphed(user[:, :, t], G.read_window(t, static_state))
        first = text if first is None else first
        assert text is first  # the same output buffer every call
        assert torch.equal(valid, ref.valid)
        assert torch.equal(text[valid], ref.text[ref.valid]) and torch.equal(audio[valid], ref.audio[ref.valid])


def test_bench_command_runs(tmp_path):
    from openmoshi.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--no-mimi", "--steps", "3", "--warmup", "1", "--batch-sizes", "1,2",
                 "--json", str(out)]) == 0
    import json
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [1, 2] and data["results"][0]["lm_step_ms"] > 0
    assert TINY.dep_q == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_on_gpu():
    lm = random_lm().cuda()
    user = torch.randint(0, 64, (2, 8, 30), device="cuda")
    eager_state = G.init_state(lm, 2, SamplingConfig.greedy())
    graph_state = G.init_state(lm, 2, SamplingConfig.greedy())

    def fn(codes, attend):
        out = G.step(lm, graph_state, codes, check=False, attend=attend)
        return out.text, out.audio, out.valid

    graphed = CUDAGraphed(fn)
    for t in range(30):
        ref = G.step(lm, eager_state, user[:, :, t])
        text, audio, valid = graphed(user[:, :, t], G.read_window(t, graph_state))
        assert torch.equal(valid, ref.valid)
        assert torch.equal(text[valid], ref.text[ref.valid]) and torch.equal(audio[valid], ref.audio[ref.valid])
    assert graphed.graph is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_triton_gemv_matches_reference_on_gpu():
    from openmoshi.accel import int8_kernel

    assert int8_kernel.available()
    w = torch.randn(2 * 300, 1000, device="cuda")
    ql = QuantizedLinear.from_weight(w, "int8", num_sets=2)
    ql.dtype = torch.bfloat16
    for rows in (1, 5):
        x = torch.randn(rows, 1000, device="cuda", dtype=torch.bfloat16)
        for i in range(2):
            ref = torch.nn.functional.linear(x.float(), ql.weight(i).float())
            assert ((ql(x, i).float() - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int4_tinygemm_matches_reference_on_gpu():
    w = torch.randn(256, 512, device="cuda")
    ql = QuantizedLinear.from_weight(w, "int4", group_size=128)
    ql.dtype = torch.bfloat16
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, ql.weight(0))
    torch.testing.assert_close(ql(x), ref, rtol=2e-2, atol=2e-1)


def _tensors(obj, seen=None):
    """Every tensor reachable from a streaming state (dataclasses, lists, tuples)."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x, seen)]
    return []


def _storages(state):
    return [(t.data_ptr(), tuple(t.shape)) for t in _tensors(state)]


def test_streaming_states_are_updated_in_place():
    """CUDA graphs replay fixed addresses: a step may change the state's values, never its tensors."""
    from openmoshi.loading.mimi import load_mimi

    lm = random_lm()
    state = G.init_state(lm, 2, SamplingConfig())
    before = _storages(state)
    assert len(before) > 10
    for t in range(4):
        G.step(lm, state, torch.randint(0, 64, (2, 8)), check=False)
        state.reset(torch.tensor([t == 2, False]))
    assert _storages(state) == before

    mimi = load_mimi(None, num_codebooks=8)
    enc, dec = mimi.init_encode_state(2), mimi.init_decode_state(2)
    enc_before, dec_before = _storages(enc), _storages(dec)
    assert len(enc_before) > 10 and len(dec_before) > 10
    with torch.no_grad():
        for t in range(3):
            codes = mimi.encode_step(torch.randn(2, 1, 1920) * 0.1, enc)
            mimi.decode_step(codes, dec)
            enc.reset(torch.tensor([t == 1, False]))
            dec.reset(torch.tensor([t == 1, False]))
    assert _storages(enc) == enc_before and _storages(dec) == dec_before
