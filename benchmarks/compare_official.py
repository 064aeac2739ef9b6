"""The official moshi 0.2.13 streaming loop and openmoshi's, same config, same device, one process.

    python benchmarks/compare_official.py --config small --batch-sizes 1,8 --device cpu
    python benchmarks/compare_official.py --config moshi_7b --batch-sizes 1,8,32,64 --device cuda
    python benchmarks/compare_official.py --codec-only --device cpu      # Mimi alone
    python benchmarks/compare_official.py --codec-only --threads 1 --whole-file 10

Random weights (nothing downloaded). Prints per-frame medians for both and the ratios
official / openmoshi (> 1 means openmoshi is faster), and writes JSON with --json.

--codec-only on CPU times the official Mimi, openmoshi's float32 reference and its CPU fast path
(`--mimi-fast`, default fp32,fp32) frame by frame, alternating between them in one loop, so load
from other jobs hits all of them alike. --whole-file S also times encode + decode of S seconds in
one call each (non-streaming) and prints the throughput as a multiple of real time.
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
    from openmoshi.engine.engine import Engine
    from openmoshi.engine.speed import SpeedConfig, prepare
    from openmoshi.lm.sampling import SamplingConfig
    from openmoshi.loading.mimi import load_mimi

    mimi = load_mimi(None, num_codebooks=max(cfg.dep_q, cfg.n_q - cfg.dep_q), device=device)
    lm = None if codec_only else bench.random_lm(cfg, device, dtype, quantize)
    # The speed paths serve and infer apply (without their start-up self-check).
    lm, mimi, speed = prepare(lm, mimi, device, SpeedConfig(self_check=False))
    engine = Engine(lm, mimi, batch_size, speed, SamplingConfig(), all_buckets=False)
    r = bench.bench_loop(engine, steps, warmup, codec_only=codec_only)
    return {"enc": r.mimi_encode_ms, "lm": r.lm_step_ms, "dec": r.mimi_decode_ms, "frame": r.frame_ms,
            "frame_p99": r.frame_p99_ms}


@torch.no_grad()
def compare_codec(batch_size, steps, warmup, device, mimi_fast):
    """Official Mimi, openmoshi reference, openmoshi fast path: one streaming frame each in turn."""
    from moshi.models import loaders

    from openmoshi.loading.mimi import load_mimi
    from openmoshi.accel.mimi_cpu import fast_cpu

    torch.manual_seed(0)
    official = loaders.get_mimi(None, device=device)
    official.set_num_codebooks(8)
    ours = load_mimi(None, num_codebooks=8, device=device)
    models = {"official": official, "openmoshi": ours}
    if mimi_fast is not None:
        models["om-fast"] = fast_cpu(ours, *mimi_fast)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    steppers = {}
    with official.streaming(batch_size):
        for name, m in models.items():
            if name == "official":
                steppers[name] = (official.encode, official.decode)
            else:
                enc, dec = m.init_encode_state(batch_size), m.init_decode_state(batch_size)
                steppers[name] = (lambda pcm, m=m, enc=enc: m.encode_step(pcm, enc),
                                  lambda codes, m=m, dec=dec: m.decode_step(codes, dec))
        times = {name: {"enc": [], "dec": [], "frame": []} for name in models}
        for i in range(warmup + steps):
            pcm = torch.randn(batch_size, 1, 1920, device=device) * 0.05
            for name, (encode, decode) in steppers.items():
                sync(); t0 = time.perf_counter()
                codes = encode(pcm)
                sync(); t1 = time.perf_counter()
                decode(codes)
                sync(); t2 = time.perf_counter()
                if i >= warmup:
                    for k, v in zip(("enc", "dec", "frame"), (t1 - t0, t2 - t1, t2 - t0)):
                        times[name][k].append(v)
    out = {}
    for name, t in times.items():
        out[name] = {k: 1000 * statistics.median(v) for k, v in t.items()}
        out[name]["lm"] = 0.0
        out[name]["frame_p99"] = 1000 * sorted(t["frame"])[int(0.99 * (len(t["frame"]) - 1))]
    return models, out


@torch.no_grad()
def whole_file(models, seconds, repeats, device):
    """Encode + decode of `seconds` of audio in one call each; seconds of audio per second of work."""
    pcm = torch.randn(1, 1, int(24000 * seconds), device=device) * 0.05
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.decode(m.encode(pcm))
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: {"seconds": t, "x_real_time": seconds / t} for name, t in best.items()}


def main():
    from openmoshi.lm.config import BUILTIN_CONFIGS, load_model_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--codec-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mimi-fast", default=None, metavar="ENC,DEC",
                   help="openmoshi Mimi CPU fast path for --codec-only (default fp32,fp32 on CPU; 'off')")
    p.add_argument("--whole-file", type=float, default=0, metavar="SECONDS",
                   help="with --codec-only: also time whole-file encode + decode of this many seconds")
    p.add_argument("--repeats", type=int, default=3, help="whole-file runs per model (best is kept)")
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
    if args.codec_only:
        from openmoshi.engine.speed import parse_mimi_fast

        mimi_fast = parse_mimi_fast(args.mimi_fast, device)
        print(f"Mimi fast path: {','.join(mimi_fast) if mimi_fast else 'off'}")
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            models, res = compare_codec(b, args.steps, args.warmup, device, mimi_fast)
            for who, r in res.items():
                print(f"{b:5d} {who:>9} {r['enc']:8.2f} {'-':>8} {r['dec']:8.2f} {r['frame']:9.2f} {r['frame_p99']:8.2f}")
            off = res["official"]
            for who in [w for w in res if w != "official"]:
                ratio = {k: off[k] / max(res[who][k], 1e-9) for k in ("enc", "dec", "frame")}
                print(f"{b:5d} {'ratio':>9} {ratio['enc']:8.2f} {'-':>8} {ratio['dec']:8.2f} {ratio['frame']:9.2f}"
                      f"   (official / {who})", flush=True)
            row = {"batch_size": b, **res}
            if args.whole_file and b == 1:
                wf = whole_file(models, args.whole_file, args.repeats, device)
                for who, r in wf.items():
                    print(f"whole file {args.whole_file:g} s, encode + decode: {who:>9} {r['seconds']:7.2f} s "
                          f"= {r['x_real_time']:5.2f}x real time")
                row["whole_file"] = wf
            rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": "mimi", "device": str(device), "threads": torch.get_num_threads(),
                           "mimi_fast": mimi_fast, "rows": rows}, f, indent=1)
        return
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
