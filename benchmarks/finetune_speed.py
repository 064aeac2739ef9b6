"""Fine-tuning speed and memory: openmoshi's training step against the official model's forward +
backward in the same process, on random weights of the same config.

    python benchmarks/finetune_speed.py --config small --device cpu              # LoRA rank 16
    python benchmarks/finetune_speed.py --config small --lora-rank 0              # full fine-tune
    python benchmarks/finetune_speed.py --paper                                   # 7B LoRA GPU memory, estimated
    python benchmarks/finetune_speed.py --config moshi_7b --device cuda --seconds 30 --grad-checkpointing

One step = the LM's training forward on a batch of codes, the loss (openmoshi's `loss_sums`, applied
to both models' outputs), backward, AdamW. The two models alternate step by step, so load from other
jobs hits both alike. tokens/s counts every code of the batch (segments x 17 streams x frames), as
moshi-finetune reports it. Peak memory: CUDA's allocator peak on a GPU; on a CPU each side runs in a
child process of its own and reports its peak resident set.

--paper prints the GPU memory of a 7B LoRA step (weights, adapters with their gradients and AdamW
state, activations) computed from the model's shapes, for ranks 16 and 128 and segments of 30 and
100 s, until a GPU measures it (benchmarks/gpu_check.sh runs --config moshi_7b on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from compare_official import official_kwargs  # noqa: E402

from openmoshi.lm.config import BUILTIN_CONFIGS, load_model_config  # noqa: E402
from openmoshi.loading.lm import load_lm  # noqa: E402
from openmoshi.training.distributed import checkpoint_layers  # noqa: E402
from openmoshi.training.lora import add_lora  # noqa: E402
from openmoshi.training.loop import make_optimizer  # noqa: E402
from openmoshi.training.metrics import peak_memory_gb  # noqa: E402
from openmoshi.training.loss import loss_sums  # noqa: E402


def build(side: str, cfg, rank: int, device, dtype, grad_checkpointing: bool):
    torch.manual_seed(0)
    if side == "openmoshi":
        lm = load_lm(None, cfg, device, dtype)
        if rank:
            add_lora(lm, rank, 2.0)
        else:
            lm.float().requires_grad_(True)
        if grad_checkpointing:
            checkpoint_layers(lm)
    else:
        from moshi.models import loaders
        from moshi.modules.lora import replace_all_linear_with_lora

        lm = loaders.get_moshi_lm(None, lm_kwargs=official_kwargs(cfg), device=device, dtype=dtype)
        if rank:  # as moshi-finetune: adapters on every linear, only they train, in float32
            replace_all_linear_with_lora(lm, rank, 2.0, device=device, dtype=torch.float32)
            for name, p in lm.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            lm.float().requires_grad_(True)
        if grad_checkpointing:
            checkpoint_layers_official(lm)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    if side == "openmoshi":
        return lm, make_optimizer(params, 1e-5, 0.1)  # as `openmoshi finetune` builds it
    return lm, torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)  # as moshi-finetune


def checkpoint_layers_official(lm) -> None:
    from moshi.modules.transformer import StreamingTransformerLayer
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    apply_activation_checkpointing(lm, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, StreamingTransformerLayer))


def batch(cfg, batch_size: int, frames: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.card, (batch_size, cfg.num_codebooks, frames), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (batch_size, frames), generator=g)
    return codes.to(device)


def step(lm, optimizer, codes, dtype) -> None:
    ctx = torch.autocast(codes.device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with ctx:
        out = lm(codes)
    text, audio = loss_sums(out, codes, 100.0, 0.5).means()
    (text + audio).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(args, cfg, device, dtype, sides) -> dict:
    models = {s: build(s, cfg, args.lora_rank, device, dtype, args.grad_checkpointing) for s in sides}
    codes = batch(cfg, args.batch_size, args.frames, device)
    times = {s: [] for s in sides}
    peaks = {}
    for i in range(args.warmup + args.steps):
        for s in sides:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            step(*models[s], codes, dtype)
            sync(device)
            if i >= args.warmup:
                times[s].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[s] = max(peaks.get(s, 0), torch.cuda.max_memory_allocated(device) / 1e9)
    tokens = codes.numel()
    out = {s: {"step_s": statistics.median(times[s]), "tokens_per_s": tokens / statistics.median(times[s])}
           for s in sides}
    for s in peaks:
        out[s]["peak_mem_gb"] = peaks[s]
    return out


def child_peak(args, side: str) -> float:
    """Peak resident set (GB) of a child process that builds `side` and runs the steps."""
    cmd = [sys.executable, __file__, "--only", side, *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--json" and not c.endswith(".json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gb"]


# ----------------------------------------------------------------------------- on paper


def lora_params(cfg, rank: int) -> int:
    lm = load_lm(None, cfg, "meta", torch.bfloat16)
    add_lora(lm, rank, 2.0)
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def paper(cfg) -> list[dict]:
    """GPU memory of one LoRA step on the 7B, batch 1, bf16 weights, float32 adapters + grads + AdamW."""
    weights = sum(p.numel() for p in load_lm(None, cfg, "meta", torch.bfloat16).parameters()) * 2
    D, L, Dd, Ld, Q = cfg.dim, cfg.num_layers, cfg.depformer_dim, cfg.depth.num_layers, cfg.dep_q
    F = 2 * int(cfg.hidden_scale * D) // 3
    Fd = 2 * cfg.depformer_dim_feedforward // 3
    # Bytes kept for backward by one layer, per position (bf16 activations, float32 norm inputs):
    # norms 2 x 4D, attention in/out projections' inputs 2 x 2D, q/k/v before and after RoPE 2 x 6D,
    # attention output 2D, gated FFN input 2D, its 2F pre-activation 4F, the gate's output 2F.
    def layer(d, f):
        return 8 * d + 4 * d + 12 * d + 2 * d + 2 * d + 6 * f
    logits = (cfg.text_card + Q * cfg.card) * 4 * 2  # float32 logits and their gradient
    rows = []
    for rank in (16, 128):
        adapters = lora_params(cfg, rank) * 16  # float32 value, gradient, AdamW's two moments
        for seconds in (30, 100):
            T = int(seconds * 12.5)
            full = T * (L * layer(D, F) + Q * Ld * layer(Dd, Fd)) + T * logits
            ckpt = T * (L * 2 * D + Q * Ld * 2 * Dd) + T * max(layer(D, F), Q * layer(Dd, Fd)) + T * logits
            rows.append({"rank": rank, "seconds": seconds, "weights_gb": weights / 1e9, "adapters_gb": adapters / 1e9,
                         "activations_gb": full / 1e9, "activations_ckpt_gb": ckpt / 1e9,
                         "total_gb": (weights + adapters + full) / 1e9,
                         "total_ckpt_gb": (weights + adapters + ckpt) / 1e9})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help="tiny, small, moshi_7b or a config.json")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="segment length")
    p.add_argument("--lora-rank", type=int, default=16, help="0: full fine-tune")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-official", action="store_true")
    p.add_argument("--paper", action="store_true", help="the 7B LoRA step's GPU memory, estimated")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paper:
        rows = paper(BUILTIN_CONFIGS["moshi_7b"])
        print("7B LoRA step, batch 1, on paper (GB): rank, seconds, weights, adapters+grads+AdamW, "
              "activations, total; with gradient checkpointing")
        for r in rows:
            print(f"  r={r['rank']:<4} {r['seconds']:>4} s  weights {r['weights_gb']:.1f}  adapters {r['adapters_gb']:.2f}  "
                  f"activations {r['activations_gb']:.1f}  total {r['total_gb']:.1f}  |  checkpointed: "
                  f"activations {r['activations_ckpt_gb']:.2f}  total {r['total_ckpt_gb']:.1f}")
        if args.json:
            json.dump({"paper": rows}, open(args.json, "w"), indent=1)
        return
    cfg = BUILTIN_CONFIGS[args.config] if args.config in BUILTIN_CONFIGS else load_model_config(args.config).lm
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.frames = int(args.seconds * 12.5)
    if args.only:
        timed(args, cfg, device, dtype, [args.only])
        print(json.dumps({"peak_rss_gb": peak_memory_gb("cpu")}))
        return
    sides = ["openmoshi"] + ([] if args.no_official else ["official"])
    result = timed(args, cfg, device, dtype, sides)
    if device.type == "cpu":
        for s in sides:
            result[s]["peak_mem_gb"] = child_peak(args, s)
    what = "full" if args.lora_rank == 0 else f"LoRA r={args.lora_rank}"
    print(f"{args.config}, {what}, batch {args.batch_size} x {args.seconds:g} s, {device}, {str(dtype)[6:]}"
          + (", checkpointed" if args.grad_checkpointing else ""))
    for s in sides:
        r = result[s]
        print(f"  {s:<10} {r['step_s'] * 1000:8.1f} ms/step  {r['tokens_per_s']:9.0f} tokens/s  "
              f"peak {r.get('peak_mem_gb', float('nan')):.2f} GB")
    if "official" in result:
        ratio = result["official"]["step_s"] / result["openmoshi"]["step_s"]
        print(f"  speed ratio official/openmoshi: {ratio:.2f} (> 1: openmoshi faster)")
        result["ratio"] = {"step": ratio}
    if args.json:
        json.dump({"config": args.config, "rank": args.lora_rank, "batch_size": args.batch_size,
                   "seconds": args.seconds, "device": str(device), **result}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
