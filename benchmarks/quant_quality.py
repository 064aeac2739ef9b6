"""Quality of weight-only int8 / int4 quantization of the LM (issue 5): how far the quantized model's
text and audio distributions move from the bf16 model's, on the same weights and the same inputs.

    python benchmarks/quant_quality.py [--config moshi_7b] [--temporal-layers 4] [--json out.json]

One random-weight LM of an official config (default the 7B) is built in float32 from a fixed seed;
its bf16 copy is the reference, and the int8 (per output channel) and int4 (groups of
`--group-size` inputs) models are quantized from that bf16 copy, as `load_lm(..., quantize=...)`
does. All of them read the same codes: a text stream that looks like Moshi's (mostly padding, a word
token now and then) and uniform random audio codes. Two ways to run the model:

- whole sequence: the training forward `lm(codes)`, logits aligned with the targets (many rows per
  matmul: the dequantize-then-matmul path for int8, tinygemm for int4);
- step by step (`--stream-frames`): the first frames again one step at a time with the KV cache,
  as `generate.step` runs them (one row per matmul: on CUDA the int8 GEMV kernel), but reading the
  given tokens instead of sampled ones, so that every model sees the same inputs.

Per stream (text; audio, all 8 codebooks and each one: 0 is the semantic codebook, 1-7 acoustic):
top-1 agreement (argmax equal), mean KL(ref || other) in nats, the mean entropy of the reference
distribution, and the relative error of the logits (RMS of the mean-centred difference over RMS of
the mean-centred reference). The "fp32 vs bf16" row (reference fp32) says how much bf16 alone moves
things. Random weights give near-uniform distributions (entropy close to ln(vocabulary)), which
makes top-1 fragile and KL small in absolute terms; see benchmarks/RESULTS.md.

The full 7B needs ~4 bytes per parameter at once (31 GB, the float32 build); `--temporal-layers` and
`--depformer-layers` keep the 7B's widths with fewer layers for a small machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402

from openmoshi.loading.lm import load_lm  # noqa: E402
from openmoshi.lm.config import BUILTIN_CONFIGS, TEXT_END_PADDING_ID, TEXT_PADDING_ID, LMConfig  # noqa: E402
from openmoshi.lm.delays import delay_codes, undelay  # noqa: E402
from openmoshi.lm.model import LMModel, LMOutput  # noqa: E402
from openmoshi.accel.quantize import QuantizedLinear, quantize_lm, set_compute_dtype  # noqa: E402
from openmoshi.modules.transformer import Transformer, layer_linears  # noqa: E402

REFERENCE = torch.bfloat16
WORD_RATE = 0.2  # text tokens per frame that start a word (Moshi's text stream is mostly padding)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="moshi_7b", choices=list(BUILTIN_CONFIGS))
    p.add_argument("--temporal-layers", type=int, default=None, help="cut the temporal transformer to N layers")
    p.add_argument("--depformer-layers", type=int, default=None, help="cut the depth transformer to N layers")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (inputs per scale/offset)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=300, help="frames of the whole-sequence forward (12.5 per second)")
    p.add_argument("--stream-frames", type=int, default=None,
                   help="frames also run step by step (default: 48 on CUDA, 0 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p


def cut_config(cfg: LMConfig, temporal_layers: int | None, depformer_layers: int | None) -> LMConfig:
    """The same widths with fewer layers."""
    changes = {}
    if temporal_layers is not None:
        changes["num_layers"] = temporal_layers
    if depformer_layers is not None:
        changes["depformer_num_layers"] = depformer_layers
    elif temporal_layers is not None and cfg.depformer_num_layers is None:
        changes["depformer_num_layers"] = cfg.depth.num_layers  # it followed num_layers: keep it whole
    return dataclasses.replace(cfg, **changes)


def make_codes(cfg: LMConfig, batch: int, frames: int, seed: int) -> torch.Tensor:
    """[B, K, T]: text mostly padding, a random word token starting now and then, preceded by the
    end-of-padding token; uniform random audio codes in every codebook."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (batch, cfg.num_codebooks, frames), generator=g)
    text = torch.full((batch, frames), TEXT_PADDING_ID)
    starts = torch.rand(batch, frames, generator=g) < WORD_RATE
    starts[:, 0] = False
    text[starts] = torch.randint(4, cfg.text_card, (int(starts.sum()),), generator=g)
    before = torch.roll(starts, -1, dims=1) & (text == TEXT_PADDING_ID)
    before[:, -1] = False
    text[before] = TEXT_END_PADDING_ID
    codes[:, 0] = text
    return codes


@torch.no_grad()
def step_by_step(lm: LMModel, codes: torch.Tensor, frames: int) -> LMOutput:
    """The first `frames` frames of `codes` one step at a time through the KV caches, teacher-forced:
    the temporal step reads the same delayed tokens as `lm(codes)`, the depth steps the frame's
    given tokens. Same layout as `lm(codes[:, :, :frames])`."""
    cfg = lm.cfg
    codes = codes[:, :, :frames]
    B, K, T = codes.shape
    Q = cfg.dep_q
    initial = lm.initial_tokens(codes.device)
    delayed = delay_codes(codes, cfg.delays, initial)  # [B, K, T], what step t predicts
    inputs = torch.cat([initial.view(1, K, 1).expand(B, K, 1), delayed[:, :, :-1]], dim=2)  # what step t reads
    dtype = lm.text_emb.weight.dtype  # never swapped by quantization
    temporal = lm.transformer.init_state(B, dtype=dtype, capacity=None if cfg.context else T)
    depth = lm.depformer.init_state(B, dtype=dtype, capacity=Q)
    text, audio = [], []
    for t in range(T):
        attend = Transformer.read_window(t, temporal.capacity)
        hidden, text_logits = lm.forward_text(inputs[:, :, t:t + 1], temporal, attend=attend)  # [B, 1, D], [B, 1, N]
        depth.reset()
        per_q = []
        for q in range(Q):
            x = lm.depformer_input(q, delayed[:, q, t:t + 1], hidden)  # previous stream's token, [B, 1, Dd]
            per_q.append(lm.depformer_logits(q, lm.depformer(x, depth, step=q)))  # [B, 1, card]
        text.append(text_logits)
        audio.append(torch.stack(per_q, dim=1))  # [B, Q, 1, card]
    logits, mask = undelay(torch.cat(audio, dim=2), cfg.delays[1:Q + 1])  # [B, Q, T, card]
    text_logits, text_mask = undelay(torch.cat(text, dim=1)[:, None], cfg.delays[:1])  # [B, 1, T, N]
    return LMOutput(logits, mask, text_logits, text_mask)


def valid_rows(out: LMOutput, like: LMOutput | None = None) -> dict[str, torch.Tensor]:
    """Logits at the valid positions, float32 on the CPU: {"text": [n, N], "audio0".."audio7": [n, card]}.
    With `like` (a shorter step-by-step run), only the positions that are valid in `like`."""
    text_mask, mask = out.text_mask, out.mask
    if like is not None:
        T = like.mask.shape[2]
        text_mask, mask = text_mask[:, :, :T] & like.text_mask, mask[:, :, :T] & like.mask
    T = mask.shape[2]
    rows = {"text": out.text_logits[:, 0, :T][text_mask[:, 0]].float().cpu()}
    for q in range(out.logits.shape[1]):
        rows[f"audio{q}"] = out.logits[:, q, :T][mask[:, q]].float().cpu()
    return rows


def position_stats(ref: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of two logit sets [n, V]: sums are taken by `summarize`."""
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    p = lp.exp()
    centred_ref = ref - ref.mean(-1, keepdim=True)
    diff = other - other.mean(-1, keepdim=True) - centred_ref
    return {"agree": (ref.argmax(-1) == other.argmax(-1)).double(),
            "kl": (p * (lp - lq)).sum(-1).clamp(min=0).double(),  # >= 0 up to float rounding
            "entropy": -(p * lp).sum(-1).double(),
            "err2": diff.pow(2).sum(-1).double(), "ref2": centred_ref.pow(2).sum(-1).double()}


def summarize(stats: list[dict[str, torch.Tensor]], vocab: int) -> dict:
    s = {k: torch.cat([x[k] for x in stats]) for k in stats[0]}
    return {"top1": s["agree"].mean().item(), "kl": s["kl"].mean().item(),
            "ref_entropy": s["entropy"].mean().item(), "max_entropy": math.log(vocab),
            "rel_logit_err": math.sqrt(s["err2"].sum().item() / s["ref2"].sum().item()),
            "positions": s["agree"].numel()}


def compare(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    stats = {k: position_stats(ref[k], other[k]) for k in ref}
    audio = sorted((k for k in ref if k.startswith("audio")), key=lambda k: int(k[5:]))
    vocab = lambda k: ref[k].shape[-1]
    res = {"text": summarize([stats["text"]], vocab("text")),
           "audio": summarize([stats[k] for k in audio], vocab(audio[0]))}
    if audio:
        res["audio_semantic"] = summarize([stats[audio[0]]], vocab(audio[0]))
        if len(audio) > 1:
            res["audio_acoustic"] = summarize([stats[k] for k in audio[1:]], vocab(audio[0]))
        res["audio_per_codebook"] = [summarize([stats[k]], vocab(k)) for k in audio]
    return res


def quantized_fraction(lm: torch.nn.Module) -> float:
    """Share of the model's weights (by count) held by quantized linears."""
    quant = sum(m.in_dim * m.out_dim * (m.scale.shape[0] // m.out_dim)
                for m in lm.modules() if isinstance(m, QuantizedLinear))
    rest = sum(p.numel() for p in lm.parameters())
    return quant / (quant + rest)


def linears(lm: LMModel) -> list[torch.nn.Module]:
    return [getattr(m, name) for t in (lm.transformer, lm.depformer) if t is not None for m, name in layer_linears(t)]


@torch.no_grad()
def weight_error(lm: LMModel, qlm: LMModel) -> float:
    """||W_quant - W|| / ||W|| over all quantized linears (Frobenius norms, summed over layers)."""
    err2 = ref2 = 0.0
    for old, new in zip(linears(lm), linears(qlm)):
        if isinstance(new, QuantizedLinear):
            sets = new.scale.shape[0] // new.out_dim
            w = old.weight.float()
            deq = torch.cat([new.weight(i).float() for i in range(sets)])
            err2 += (deq - w).pow(2).sum().item()
            ref2 += w.pow(2).sum().item()
    return math.sqrt(err2 / ref2)


def check_memory(cfg: LMConfig, device: torch.device) -> int:
    """Parameter count; on CPU, refuses a model whose float32 build would not fit in free RAM."""
    with torch.device("meta"):
        params = sum(p.numel() for p in LMModel(cfg).parameters())
    if device.type == "cpu" and hasattr(os, "sysconf"):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        need = 4.3 * params  # the float32 build, then the bf16 reference plus one copy being quantized
        if need > free:
            sys.exit(f"quant_quality: {params / 1e9:.2f} B parameters need ~{need / 1e9:.0f} GB, "
                     f"{free / 1e9:.0f} GB free: cut the depth with --temporal-layers N")
    return params


@torch.no_grad()
def run_all(lm: LMModel, codes: torch.Tensor, stream_frames: int, head: bool = False) -> dict:
    """{"forward": rows of lm(codes), "step": rows of the step-by-step run}; with `head`, also
    "forward_head": the rows of lm(codes) at the positions of the step-by-step run."""
    whole = lm(codes)
    out = {"forward": valid_rows(whole)}
    if stream_frames:
        step = step_by_step(lm, codes, stream_frames)
        out["step"] = valid_rows(step)
        if head:
            out["forward_head"] = valid_rows(whole, like=step)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("temporal_layers", "depformer_layers", "group_size", "batch", "frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stream_frames = args.stream_frames if args.stream_frames is not None else (48 if device.type == "cuda" else 0)
    stream_frames = min(stream_frames, args.frames)
    full = BUILTIN_CONFIGS[args.config]
    cfg = cut_config(full, args.temporal_layers, args.depformer_layers)
    params = check_memory(cfg, device)
    codes = make_codes(cfg, args.batch, args.frames, args.seed + 1).to(device)
    times: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        r = fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[name] = round(time.perf_counter() - t, 2)
        return r

    torch.manual_seed(args.seed)
    lm = timed("build_fp32", load_lm, None, cfg, device, torch.float32)
    logits = {"fp32": timed("run_fp32", run_all, lm, codes, stream_frames)}
    lm.to(REFERENCE)  # the bf16 reference: the same weights rounded, as load_lm(dtype=bf16) builds them
    if lm.condition_provider is not None:
        lm.condition_provider.float()
    logits["bf16"] = timed("run_bf16", run_all, lm, codes, stream_frames, True)
    head = logits["bf16"].pop("forward_head", None)
    fractions, weight_errors = {}, {}
    for mode in ("int8", "int4"):
        qlm = quantize_lm(copy.deepcopy(lm), mode, args.group_size)
        set_compute_dtype(qlm, REFERENCE)
        fractions[mode] = quantized_fraction(qlm)
        weight_errors[mode] = weight_error(lm, qlm)
        logits[mode] = timed(f"run_{mode}", run_all, qlm, codes, stream_frames)
        del qlm

    pairs = {"fp32_vs_bf16": ("fp32", "bf16"), "int8_vs_bf16": ("bf16", "int8"), "int4_vs_bf16": ("bf16", "int4")}
    results = {name: {kind: compare(logits[ref][kind], logits[other][kind]) for kind in logits[ref]}
               for name, (ref, other) in pairs.items()}
    if stream_frames:  # the step-by-step path computes the same function as the whole sequence
        results["bf16_step_vs_forward"] = {"step": compare(head, logits["bf16"]["step"])}
    report = {
        "config": args.config, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "random_weights": True, "seed": args.seed, "params": params,
        "temporal_layers": cfg.num_layers, "temporal_layers_full": full.num_layers,
        "depformer_layers": cfg.depth.num_layers, "depformer_layers_full": full.depth.num_layers,
        "cut": (cfg.num_layers, cfg.depth.num_layers) != (full.num_layers, full.depth.num_layers),
        "dim": cfg.dim, "depformer_dim": cfg.depformer_dim, "reference_dtype": "bfloat16",
        "int4_group_size": args.group_size, "quantized_fraction": fractions,
        "weight_rel_err": weight_errors,
        "batch": args.batch, "frames": args.frames, "stream_frames": stream_frames,
        "seconds": times, "results": results,
    }
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def print_report(r: dict) -> None:
    cut = " (depth cut)" if r["cut"] else ""
    print(f"{r['config']} widths (dim {r['dim']}, depformer {r['depformer_dim']}), temporal "
          f"{r['temporal_layers']}/{r['temporal_layers_full']} layers, depformer {r['depformer_layers']}/"
          f"{r['depformer_layers_full']} layers{cut}: {r['params'] / 1e9:.2f} B params, RANDOM weights (seed {r['seed']})")
    qf = r["quantized_fraction"]
    print(f"{r['device']}, torch {r['torch']}, {r['threads']} threads; batch {r['batch']} x {r['frames']} frames"
          f" (step by step: {r['stream_frames']}); int4 group size {r['int4_group_size']}; quantized share of "
          f"weights int8 {100 * qf['int8']:.1f}%, int4 {100 * qf['int4']:.1f}%")
    we = r["weight_rel_err"]
    print(f"relative error of the quantized weights: int8 {we['int8']:.2e}, int4 {we['int4']:.2e}; seconds {r['seconds']}")
    rows = [("text", "text"), ("audio", "audio all"), ("audio_semantic", "audio cb0 (semantic)"),
            ("audio_acoustic", "audio cb1-7 (acoustic)")]
    for kind, title in (("forward", "whole sequence, lm(codes)"), ("step", "step by step, teacher-forced")):
        if kind not in r["results"]["int8_vs_bf16"]:
            continue
        print(f"\n{title}")
        print(f"{'comparison':22s} {'stream':24s} {'top-1':>7s} {'KL nats':>10s} {'ref H / ln V':>14s} {'rel logit err':>13s}")
        for name, cmp in r["results"].items():
            if kind not in cmp:
                continue
            for key, label in rows:
                if key not in cmp[kind]:
                    continue
                m = cmp[kind][key]
                print(f"{name:22s} {label:24s} {100 * m['top1']:6.2f}% {m['kl']:10.2e} "
                      f"{m['ref_entropy']:6.3f} / {m['max_entropy']:5.2f} {m['rel_logit_err']:13.2e}")
        print("per audio codebook, top-1 % / KL nats:")
        for name, cmp in r["results"].items():
            if kind in cmp and "audio_per_codebook" in cmp[kind]:
                cells = "  ".join(f"{100 * m['top1']:5.1f}/{m['kl']:.1e}" for m in cmp[kind]["audio_per_codebook"])
                print(f"  {name:22s} {cells}")


if __name__ == "__main__":
    main()
