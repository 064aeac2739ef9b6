"""Peak memory of building or loading an LM, measured in a fresh process (run by test_memory.py).

    python tests/memory_probe.py random bfloat16 none          # or: load PATH, or q8 PATH
    -> {"peak_gb": ..., "final_gb": ..., "largest_layer_float_gb": ...}

Two peaks while the model is made, above what the process held before:
- `tensor_peak_gb`, exact: the running total of torch's CPU allocator, every allocation and free as
  its profiler records them, so a copy that lives a microsecond counts. (The kernel's own peaks do
  not fit: VmHWM counts the memory-mapped checkpoint's pages, which are the file's, not the
  model's; VmPeak and an address-space limit count safetensors' two whole-file mappings and
  reservations never touched; this machine has no cgroup v2 `memory.peak`.)
- `peak_gb`: anonymous memory (RssAnon), sampled every 2 ms by a thread, for memory that is not
  torch's (it can miss a short copy; the exact peak above cannot).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from openmoshi.accel.quantize import QuantizedLinear
from openmoshi.lm.config import lm_config_from_dict
from openmoshi.loading.lm import load_lm
from openmoshi.modules.transformer import layer_linears

# The 7B's widths (dim 4096, its feed-forward and heads, 16 audio streams, the 1024-wide depth
# transformer with 8 weight sets), with 2 temporal layers and 1 depth layer, and a smaller text vocabulary.
WIDE_7B = dict(
    dim=4096, text_card=8000, existing_text_padding_id=3, n_q=16, dep_q=8, card=2048, num_heads=32,
    num_layers=2, hidden_scale=4.125, causal=True, context=3000, max_period=10000, gating="silu",
    norm="rms_norm_f32", positional_embedding="rope", depformer_dim=1024, depformer_dim_feedforward=4224,
    depformer_num_heads=16, depformer_num_layers=1, depformer_multi_linear=True, depformer_context=8,
    depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
    depformer_weights_per_step=True, delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def tensor_peak(fn):
    """(fn(), the peak bytes of torch's CPU allocator while fn ran, over what it held before)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(trace)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler recorded no allocation"
    return result, max(totals)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main(kind: str, dtype: str, quantize: str, path: str | None = None, config: str = "wide_7b") -> dict:
    """kind: random or load (path); config: wide_7b or a built-in config name (tiny, small)."""
    from openmoshi.lm.config import BUILTIN_CONFIGS

    torch.set_num_threads(1)
    cfg = lm_config_from_dict(WIDE_7B) if config == "wide_7b" else BUILTIN_CONFIGS[config]
    quantize = None if quantize == "none" else quantize
    peak, base, done = [0], anon_bytes(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model, tensor_peak_bytes = tensor_peak(lambda: load_lm(None if kind == "random" else path, cfg, "cpu",
                                                           getattr(torch, dtype), quantize=quantize))
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anon_bytes())
    elem = getattr(torch, dtype).itemsize
    sizes = [getattr(owner, attr) for owner, attr in layer_linears(model)]
    largest = max(m.scale.shape[0] * m.in_dim if isinstance(m, QuantizedLinear) else m.weight.numel() for m in sizes)
    return {"peak_gb": (peak[0] - base) / 1e9, "tensor_peak_gb": tensor_peak_bytes / 1e9,
            "final_gb": model_bytes(model) / 1e9,
            "largest_linear_float_gb": largest * elem / 1e9}


if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(args.index("--config") + 1) if "--config" in args else "wide_7b"
    args = [a for a in args if a != "--config"]
    print(json.dumps(main(*args, config=config)))
