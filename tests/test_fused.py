"""The fused Triton kernels (openmoshi/accel/fused.py) compute what the reference modules compute.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import copy

import pytest
import torch

from openmoshi.accel import fused
from openmoshi.lm import generate
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.modules.transformer import Attention, Gating, RMSNorm, Transformer, TransformerConfig
from lm_utils import TINY_7B

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs Triton (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(a, b, dtype, scale=1.0):
    tol = scale * {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f32", [True, False])
def test_rms_norm(dtype, f32):
    norm = RMSNorm(96, eps=1e-8 if f32 else 1e-5, f32=f32).to(DEVICE)
    with torch.no_grad():
        norm.alpha.normal_()
    x = torch.randn(2, 3, 96, device=DEVICE).to(dtype)
    ref = norm(x)
    fused.apply(norm)
    assert isinstance(norm, fused.FusedRMSNorm)
    with torch.no_grad():
        y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, ref, dtype)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate(act, dtype):
    g = Gating(64, 256, act).to(DEVICE, dtype)
    h = torch.randn(2, 5, 2 * 1100, device=DEVICE).to(dtype)  # F = 1100: two blocks, the second masked
    ref = Gating.gate(g, h)
    with torch.no_grad():
        close(fused.gate(h, act), ref, dtype)


@pytest.mark.parametrize("rope", ["rope", "none"])
@pytest.mark.parametrize("kv_repeat", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_and_cache(rope, kv_repeat, dtype):
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=1, dim_feedforward=128, context=5,
                            positional_embedding=rope, kv_repeat=kv_repeat)
    attn = Attention(cfg).to(DEVICE, dtype)
    B, T, C = 3, 2, 7
    qkv = torch.randn(B, T, attn.qkv_dim, device=DEVICE).to(dtype)
    q_pos = torch.tensor([[5, 6], [0, 1], [12, 13]], device=DEVICE)  # 13 % 7 wraps around the ring
    caches = [torch.randn(B, attn.kv_heads, C, cfg.head_dim, device=DEVICE).to(dtype) for _ in range(2)]
    with torch.no_grad():
        ref = attn.rotate_and_cache(qkv, q_pos, tuple(c.clone() for c in caches), None, 6)
        fused.apply(attn)
        out = attn.rotate_and_cache(qkv, q_pos, tuple(caches), None, 6)
    for a, b in zip(out, ref):
        close(a, b, dtype)
    assert out[1].data_ptr() == caches[0].data_ptr()  # written in place: a CUDA graph sees it


@pytest.mark.parametrize("norm,layer_scale,dtype", [("rms_norm_f32", 0.1, torch.float32),
                                                     ("rms_norm_f32", 0.1, torch.bfloat16),
                                                     ("rms_norm", None, torch.bfloat16),
                                                     ("layer_norm", 0.01, torch.float32)])
def test_transformer_streaming_equals_reference(norm, layer_scale, dtype):
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=256, context=6,
                            norm=norm, gating="silu", layer_scale=layer_scale)
    ref = Transformer(cfg).to(DEVICE, dtype)
    fast = fused.apply(copy.deepcopy(ref))
    sr, sf = ref.init_state(2, device=DEVICE, dtype=dtype), fast.init_state(2, device=DEVICE, dtype=dtype)
    active = torch.tensor([True, False], device=DEVICE)
    with torch.no_grad():
        for t in range(8):  # past the context: the ring wraps
            x = torch.randn(2, 1, 64, device=DEVICE).to(dtype)
            a = None if t % 3 else active
            # bfloat16: the plain rms_norm rounds its variance to bfloat16, the kernel keeps float32
            close(fast(x, sf, a), ref(x, sr, a), dtype, scale=3.0)


def test_cross_attention_layers_equal_reference():
    """Kyutai TTS's layers (cross-attention on a fixed source) run the reference path when fused."""
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=256, context=6,
                            norm="rms_norm_f32", gating="silu", cross_attention=True)
    ref = Transformer(cfg).to(DEVICE)
    fast = fused.apply(copy.deepcopy(ref))
    src = torch.randn(2, 10, 64, device=DEVICE)
    sr, sf = (m.init_state(2, device=DEVICE, cross_len=10) for m in (ref, fast))
    ref.set_cross(sr, src), fast.set_cross(sf, src)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 1, 64, device=DEVICE)
            close(fast(x, sf), ref(x, sr), torch.float32)


@pytest.mark.parametrize("scale", [True, False])
def test_add_rms_norm(scale):
    x, r = torch.randn(2, 3, 80, device=DEVICE), torch.randn(2, 3, 80, device=DEVICE)
    s, alpha = torch.rand(80, device=DEVICE), torch.randn(1, 1, 80, device=DEVICE)
    norm = RMSNorm(80, 1e-8, True).to(DEVICE)
    norm.alpha.data = alpha
    ref_x = x + (s * r if scale else r)
    with torch.no_grad():
        out_x, out_y = fused.add_rms_norm(x, r, s if scale else None, alpha, 1e-8)
        close(out_x, ref_x, torch.float32)
        close(out_y, norm(ref_x), torch.float32)


def test_lm_generation_equals_reference():
    """Greedy generation with the 7B structure (tiny widths): identical tokens with the kernels."""
    from openmoshi.loading.lm import load_lm

    torch.manual_seed(0)
    cfg = lm_config_from_dict(TINY_7B)
    ref = load_lm(None, cfg, device=DEVICE, dtype=torch.float32)
    fast = fused.apply(copy.deepcopy(ref))
    assert fused.is_applied(fast) and not fused.is_applied(ref)
    greedy = SamplingConfig(temp=0.0, temp_text=0.0)
    s1, s2 = generate.init_state(ref, 2, greedy), generate.init_state(fast, 2, greedy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):  # the audio delay is 1: outputs from the second step (Triton's interpreter is slow)
            codes = torch.randint(0, cfg.card, (2, cfg.num_user_codebooks), generator=g).to(DEVICE)
            a, b = generate.step(ref, s1, codes), generate.step(fast, s2, codes)
            assert torch.equal(a.text, b.text) and torch.equal(a.audio, b.audio)
        assert bool(a.valid.all())


def test_state_dict_unchanged_and_training_and_cpu_without_interpreter_fall_back(monkeypatch):
    norm = RMSNorm(8, 1e-5, False)
    keys = list(norm.state_dict())
    fused.apply(norm)
    assert list(norm.state_dict()) == keys
    norm(torch.randn(2, 8, requires_grad=True)).sum().backward()  # grad mode: the reference runs
    assert norm.alpha.grad is not None
    monkeypatch.setattr(fused, "INTERPRET", False)
    if DEVICE == "cpu":
        assert not fused.usable(torch.zeros(1))
        x = torch.randn(3, 8)
        torch.testing.assert_close(norm(x), RMSNorm.forward(norm, x))


def test_the_speed_registry_applies_the_kernels_on_cuda(monkeypatch):
    from openmoshi.engine.speed import SpeedConfig, prepare

    def lm():  # the registry looks at the device only: CPU modules stand in
        return Transformer(TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=64,
                                             norm="rms_norm_f32", gating="silu"))
    cuda = torch.device("cuda")
    m, _, speed = prepare(lm(), torch.nn.Sequential(), cuda, SpeedConfig(self_check=False))
    assert fused.is_applied(m) and speed.fused
    m, _, speed = prepare(lm(), torch.nn.Sequential(), cuda, SpeedConfig(fused=False, self_check=False))
    assert not fused.is_applied(m) and not speed.fused
    monkeypatch.setenv("OPENMOSHI_NO_FUSED_KERNELS", "1")
    m, _, speed = prepare(lm(), torch.nn.Sequential(), cuda, SpeedConfig(self_check=False))
    assert not fused.is_applied(m) and not speed.fused


def test_int8_gemv_kernel_matches_reference():
    from openmoshi.accel import int8_kernel
    from openmoshi.accel.quantize import QuantizedLinear

    w = torch.randn(2 * 40, 300, device=DEVICE)
    ql = QuantizedLinear.from_weight(w, "int8", num_sets=2)
    x = torch.randn(3, 300, device=DEVICE)
    for i in range(2):
        rows = slice(i * 40, (i + 1) * 40)
        y = int8_kernel.int8_gemv(x, ql.qweight[rows], ql.scale[rows])
        close(y, torch.nn.functional.linear(x, ql.weight(i).float()), torch.float32)
