"""GPU kernel launches per streaming frame, eager vs fused kernels (openmoshi/accel/fused.py).

At batch 1 the 7B step is bound by per-kernel cost as much as by reading weights: each launch
costs a few microseconds even inside a CUDA graph. This counts, on CPU, the aten operators of one
LM step (`generate.step`) and one Mimi encode + decode step that launch a kernel on CUDA (views,
reshapes that are views and allocations are not counted), plus the Triton kernels of the fused
path. The count depends on the structure (layers, steps, heads), not on the widths, so the 7B
structure runs here at small widths.

    python benchmarks/kernel_count.py            # 7B structure
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmoshi.accel import fused
from openmoshi.lm import generate
from openmoshi.loading.lm import load_lm
from openmoshi.lm.config import BUILTIN_CONFIGS
from openmoshi.mimi.codec import Mimi
from openmoshi.lm.sampling import SamplingConfig

# Operators that never launch a kernel: views, metadata, allocations.
NO_KERNEL = {"view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "slice", "select",
             "unsqueeze", "squeeze", "as_strided", "alias", "detach", "t", "empty", "empty_strided",
             "split", "unbind", "chunk", "narrow", "lift_fresh", "_to_copy_noop", "view_as_real",
             "unflatten", "flatten", "size", "stride", "is_same_size", "split_with_sizes"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.paused = False  # inside a Triton kernel: the interpreter's own tensor work is not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if name not in NO_KERNEL and not self.paused:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn, with_triton: bool) -> tuple[int, Counter]:
    launches = Counter()
    originals = {n: getattr(fused, n) for n in ("rms_norm", "add_rms_norm", "rotate_and_cache", "gate")}
    c = Count()

    def counted(name):
        def f(*a, **k):
            launches[name] += 1
            c.paused = True
            try:
                return originals[name](*a, **k)
            finally:
                c.paused = False
        return f
    for n in originals:
        setattr(fused, n, counted(n))
    try:
        with c:
            fn()
    finally:
        for n, f in originals.items():
            setattr(fused, n, f)
    ops = c.ops + Counter({f"triton:{k}": v for k, v in launches.items()}) if with_triton else c.ops
    return sum(ops.values()), ops


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="moshi_7b", choices=sorted(BUILTIN_CONFIGS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not fused.available() or not fused.INTERPRET:
        raise SystemExit("run with Triton installed and TRITON_INTERPRET=1 (the kernels run on CPU tensors)")
    cfg = BUILTIN_CONFIGS[args.config]
    heads = cfg.num_heads // 8 or 1  # small widths, same layers, steps and per-head structure
    small = replace(cfg, dim=16 * heads, num_heads=heads, depformer_dim=64, depformer_num_heads=4,
                    depformer_dim_feedforward=256 if cfg.depformer_dim_feedforward else None,
                    text_card=1000, card=256)
    torch.manual_seed(0)
    lm = load_lm(None, small, device="cpu", dtype=torch.float32)
    mimi = Mimi().eval()
    results = {}
    for name, model, codec in (("eager", lm, mimi),
                               ("fused", fused.apply(copy.deepcopy(lm)), fused.apply(copy.deepcopy(mimi)))):
        state = generate.init_state(model, 1, SamplingConfig())
        codes = torch.zeros(1, small.num_user_codebooks, dtype=torch.long)
        enc, dec = codec.init_encode_state(1), codec.init_decode_state(1)
        pcm = torch.randn(1, 1, 1920) * 0.05
        for _ in range(3):  # past the first steps' special cases
            generate.step(model, state, codes, check=False)
            codec.decode_step(codec.encode_step(pcm, enc), dec)
        with_triton = name == "fused"
        n_lm, ops_lm = count(lambda: generate.step(model, state, codes, check=False), with_triton)
        n_enc, _ = count(lambda: codec.encode_step(pcm, enc), with_triton)
        n_dec, _ = count(lambda: codec.decode_step(codes[:, :8, None], dec), with_triton)
        results[name] = {"lm_step": n_lm, "mimi_encode": n_enc, "mimi_decode": n_dec,
                         "lm_top": ops_lm.most_common(40)}
    print(f"{args.config} structure, batch 1: kernel launches per 80 ms frame")
    print(f"{'':6s} {'LM step':>8s} {'Mimi enc':>9s} {'Mimi dec':>9s}")
    for name, r in results.items():
        print(f"{name:6s} {r['lm_step']:8d} {r['mimi_encode']:9d} {r['mimi_decode']:9d}   "
              + ", ".join(f"{k} {v}" for k, v in r["lm_top"][:6]))
    e, f = results["eager"], results["fused"]
    print("fused / eager: " + ", ".join(f"{k} {f[k] / e[k]:.2f}" for k in ("lm_step", "mimi_encode", "mimi_decode")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
