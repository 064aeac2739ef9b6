"""The official moshi 0.2.13 streaming loop and openmoshi's, same config, same device, one process.

    python benchmarks/compare_official.py --config small --batch-sizes 1,8 --device cpu
    python benchmarks/compare_official.py --config moshi_7b --batch-sizes 1,8,32,64 --device cuda
    python benchmarks/compare_official.py --codec-only --device cpu      # Mimi alone

Random weights (nothing downloaded). Prints per-frame medians for both and the ratios
official / openmoshi (> 1 means openmoshi is faster), and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the official lazy torch.compile only slows CPU runs

import torch


def official_kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("conditioners", "fuser")}


@torch.no_grad()
def run_official(cfg, batch_size, steps, warmup, device, dtype, codec_only):
    from moshi.models import LMGen, loaders

    torch.manual_seed(0)
    mimi = loaders.get_mimi(None, device=device)
    mimi.set_num_codebooks(max(cfg.dep_q, cfg.n_q - cfg.dep_q))
    lm_gen = None
    if not codec_only:
        lm = loaders.get_moshi_lm(None, lm_kwargs=official_kwargs(cfg), device=device, dtype=dtype)
        lm_gen = LMGen(lm, temp=0.8, temp_text=0.7)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    times = {"enc": [], "lm": [], "dec": [], "frame": []}
    with mimi.streaming(batch_size):
        ctx = lm_gen.streaming(batch_size) if lm_gen is not None else None
        if ctx is not None:
            ctx.__enter__()
        for i in range(warmup + steps):
            pcm = torch.randn(batch_size, 1, 1920, device=device) * 0.05
            sync(); t0 = time.perf_counter()
            codes = mimi.encode(pcm)
            sync(); t1 = time.perf_counter()
            tokens = lm_gen.step(codes[:, :, :1]) if lm_gen is not None else codes
            sync(); t2 = time.perf_counter()
            if tokens is not None:
                mimi.decode(tokens[:, 1:] if lm_gen is not None else tokens)
            sync(); t3 = time.perf_counter()
            if i >= warmup:
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    times[k].append(v)
        if ctx is not None:
            ctx.__exit__(None, None, None)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    med["frame_p99"] = 1000 * sorted(times["frame"])[int(0.99 * (len(times["frame"]) - 1))]
    return med


def run_ours(cfg, batch_size, steps, warmup, device, dtype, codec_only, quantize=None):
    from openmoshi import bench
    from openmoshi.checkpoint import load_mimi

    mimi = load_mimi(None, num_codebooks=max(cfg.dep_q, cfg.n_q - cfg.dep_q), device=device)
    lm = None if codec_only else bench.random_lm(cfg, device, dtype, quantize)
    r = bench.bench_loop(lm, mimi, batch_size, steps, warmup, device, cuda_graph=True, codec_only=codec_only)
    return {"enc": r.mimi_encode_ms, "lm": r.lm_step_ms, "dec": r.mimi_decode_ms, "frame": r.frame_ms,
            "frame_p99": r.frame_p99_ms}


def main():
    from openmoshi.config import BUILTIN_CONFIGS, load_model_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--codec-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = BUILTIN_CONFIGS[args.config] if args.config in BUILTIN_CONFIGS else load_model_config(args.config).lm
    rows = []
    print(f"config {args.config}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}, "
          f"{'codec only' if args.codec_only else 'Mimi + LM'}")
    print(f"{'batch':>5} {'who':>9} {'enc_ms':>8} {'lm_ms':>8} {'dec_ms':>8} {'frame_ms':>9} {'p99_ms':>8}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        off = run_official(cfg, b, args.steps, args.warmup, device, dtype, args.codec_only)
        ours = run_ours(cfg, b, args.steps, args.warmup, device, dtype, args.codec_only)
        for who, r in (("official", off), ("openmoshi", ours)):
            print(f"{b:5d} {who:>9} {r['enc']:8.2f} {r['lm']:8.2f} {r['dec']:8.2f} {r['frame']:9.2f} {r['frame_p99']:8.2f}")
        ratio = {k: off[k] / max(ours[k], 1e-9) for k in ("enc", "lm", "dec", "frame")}
        print(f"{b:5d} {'ratio':>9} {ratio['enc']:8.2f} {ratio['lm']:8.2f} {ratio['dec']:8.2f} {ratio['frame']:9.2f}"
              "   (official / openmoshi)", flush=True)
        rows.append({"batch_size": b, "official": off, "openmoshi": ours, "ratio": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
