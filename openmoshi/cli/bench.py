"""`openmoshi bench`: time the streaming loop on random weights of any official config."""

from __future__ import annotations

import json
from pathlib import Path

from openmoshi.cli.common import UsageError, add_memory_flag, fits
from openmoshi.loading.resolve import DTYPES, resolve_device


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time Mimi encode, LM step and Mimi decode per 80 ms frame on random weights",
        description="Runs the streaming loop with random weights (nothing is downloaded) and prints "
                    "per-frame times (median and p99) and peak GPU memory.")
    p.add_argument("--config", default="moshi_7b",
                   help="moshi_7b (default), tiny, small, or the path of an official config.json")
    p.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8,32,64")
    p.add_argument("--steps", type=int, default=50, help="timed frames per batch size")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantized LM")
    p.add_argument("--codec-only", action="store_true", help="time Mimi alone (no LM)")
    p.add_argument("--no-mimi", action="store_true", help="time the LM alone")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run eagerly on CUDA (also: environment OPENMOSHI_NO_CUDA_GRAPH=1)")
    p.add_argument("--no-fused", action="store_true",
                   help="on CUDA, keep the reference norms/RoPE/gating instead of the fused Triton kernels")
    p.add_argument("--mimi-fast", default=None, metavar="ENC,DEC",
                   help="Mimi CPU fast path: 'auto' (default on CPU: the faster of the float32 reference and "
                        "the fast path, measured on this machine and cached), 'off' (the reference), or the weight "
                        "modes (fp32|bf16|int8) of the encoder and decoder sides")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; on a CPU shared with other "
                        "jobs --threads 1 avoids stalls)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    add_memory_flag(p)
    p.set_defaults(handler=run_bench)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive, got {text!r}")
    return sizes


def run_bench(args) -> int:
    import torch

    from openmoshi import bench
    from openmoshi.lm.config import BUILTIN_CONFIGS, load_model_config

    sizes = _batch_sizes(args.batch_sizes)
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.config in BUILTIN_CONFIGS:
        cfg = BUILTIN_CONFIGS[args.config]
    else:
        cfg = load_model_config(args.config).lm
    if args.codec_only:
        from openmoshi.loading import budget

        fast = device.type == "cpu" and args.mimi_fast != "off"
        budget.check(budget.Need({"Mimi": budget.mimi_bytes(fast_copy=fast)}), device, "openmoshi bench", [],
                     args.skip_memory_check)
    else:
        from openmoshi.lm.config import ModelConfig

        mimi = False if args.no_mimi else "reference" if args.mimi_fast == "off" else True
        fits(args, "openmoshi bench", device, dtype, args.quantize, sessions=max(sizes), mimi=mimi,
             ways=["a smaller --config (small, tiny)", "smaller --batch-sizes"])(ModelConfig(lm=cfg))
    lm = None if args.codec_only else bench.random_lm(cfg, device, dtype, args.quantize)
    mimi = None
    if not args.no_mimi:
        from openmoshi.loading.mimi import load_mimi
        mimi = load_mimi(None, num_codebooks=max(cfg.gen_q, cfg.num_user_codebooks), device=device)
    from openmoshi.engine.engine import Engine
    from openmoshi.engine.speed import SpeedConfig, prepare
    from openmoshi.lm.sampling import SamplingConfig

    try:  # the speed paths serve and infer apply, without their start-up self-check
        lm, mimi, speed = prepare(lm, mimi, device, SpeedConfig(cuda_graphs=False if args.no_cuda_graph else None,
                                                              fused=False if args.no_fused else None,
                                                              mimi_fast=args.mimi_fast, self_check=False))
    except ValueError as e:
        raise UsageError(str(e)) from None
    params = sum(p.numel() for p in lm.parameters()) / 1e9 if lm is not None else 0
    print(f"openmoshi bench: config {args.config} ({params:.2f} B LM params), device {device}, {dtype_name}"
          f"{', ' + args.quantize if args.quantize else ''}, {speed.describe()}, threads {torch.get_num_threads()}")
    print(bench.HEADER)
    results = []
    for b in sizes:
        engine = Engine(lm, mimi, b, speed, SamplingConfig(), all_buckets=False)
        r = bench.bench_loop(engine, args.steps, args.warmup, args.codec_only)
        print(bench.format_row(r), flush=True)
        results.append(bench.as_dict(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "device": str(device), "dtype": dtype_name,
                                               "quantize": args.quantize, "mimi_fast": speed.mimi_fast,
                                               "mimi_times_ms": speed.mimi_choice.times_ms if speed.mimi_choice else None,
                                               "fused": speed.fused, "cuda_graphs": speed.cuda_graphs,
                                               "threads": torch.get_num_threads(), "results": results}, indent=1))
    return 0
