"""`openmoshi finetune`: fine-tune the LM on conversations in the moshi-finetune data layout.

    openmoshi finetune data.jsonl -o run [--lora-rank 128 | --full] [--config recipe.yaml]
    openmoshi finetune data.jsonl -o run --nproc 4            # torchrun with 4 processes (FSDP2)
    torchrun --nproc-per-node 4 -m openmoshi finetune data.jsonl -o run
    openmoshi finetune export run -o model_dir [--merge] [--step N]

A YAML file (--config) may hold any option under its flag name (`lora_rank: 64`, `lr: 1e-5`);
flags on the command line override it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from openmoshi.cli.common import UsageError, add_model_args, finite_float, positive_int

EXPORT = "finetune-export"  # `openmoshi finetune export ...` is routed to this parser


def route(argv: list[str]) -> list[str]:
    """`finetune export ...` -> the export subcommand's own parser."""
    if argv[:2] == ["finetune", "export"]:
        return [EXPORT, *argv[2:]]
    return argv


def add_finetune_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune the LM (LoRA or full) on stereo conversations",
        description="Fine-tune the LM on a .jsonl manifest of stereo wavs (channel 0 the model, channel 1 "
                    "the user) with word alignments beside them (see 'openmoshi annotate'). Writes "
                    "RUN_DIR/checkpoints/checkpoint_NNNNNN/consolidated/ (lora.safetensors or "
                    "consolidated.safetensors, and config.json) and RUN_DIR/metrics.jsonl. "
                    "'openmoshi finetune export RUN_DIR -o DIR --merge' writes a merged model folder.")
    p.add_argument("manifest", nargs="?", metavar="MANIFEST.jsonl", help="training conversations")
    p.add_argument("-o", "--output", dest="run_dir", metavar="RUN_DIR", help="the run's folder")
    p.add_argument("--config", dest="recipe", metavar="FILE.yaml", help="options from a YAML file (flags override)")
    add_model_args(p)
    p.set_defaults(hf_repo=None)  # None: not given, so a --config file may set it (TrainConfig's default otherwise)
    g = p.add_argument_group("what trains")
    g.add_argument("--full", action="store_const", const=True, default=None,
                   help="train every weight instead of LoRA adapters")
    g.add_argument("--lora-rank", type=positive_int, metavar="R", help="LoRA rank (default 128)")
    g.add_argument("--lora-scaling", type=finite_float, metavar="S", help="LoRA scaling (default 2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, metavar="N", help="training steps (default 2000)")
    g.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="segments per step over all processes together (default 16)")
    g.add_argument("--duration", type=finite_float, metavar="SECONDS", help="segment length (default 100)")
    g.add_argument("--lr", type=finite_float, help="peak learning rate (default 2e-6)")
    g.add_argument("--weight-decay", type=finite_float, help="AdamW weight decay (default 0.1)")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default: --warmup of --steps)")
    g.add_argument("--warmup", type=finite_float, metavar="FRACTION", help="warm-up as a fraction of --steps (default 0.05)")
    g.add_argument("--max-norm", type=finite_float, help="clip gradients to this global norm (default 1)")
    g.add_argument("--first-codebook-weight", type=finite_float, metavar="W",
                   help="loss weight of the first (semantic) codebook against the others (default 100)")
    g.add_argument("--text-padding-weight", type=finite_float, metavar="W",
                   help="loss weight of padding in the text stream (default 0.5)")
    g.add_argument("--grad-checkpointing", action="store_const", const=True, default=None,
                   help="recompute each transformer layer's activations in the backward pass (less memory)")
    g.add_argument("--seed", type=int, help="adapter initialisation and data order (default 0)")
    g = p.add_argument_group("evaluation, checkpoints, processes")
    g.add_argument("--eval-data", metavar="M.jsonl", help="evaluation conversations")
    g.add_argument("--eval-every", type=positive_int, metavar="N", help="evaluate every N steps (default 100)")
    g.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps, 0: at the end only (default 100)")
    g.add_argument("--resume", action="store_const", const=True, default=None,
                   help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--codes-cache", metavar="DIR", help="where Mimi codes are cached (default: beside each manifest)")
    g.add_argument("--nproc", type=positive_int, metavar="N",
                   help="run N processes with torchrun (one per GPU; gloo on CPUs)")
    p.set_defaults(handler=run_finetune)

    e = subparsers.add_parser(EXPORT, help=argparse.SUPPRESS, prog="openmoshi finetune export",
                              description="Write a run's checkpoint as a model folder (config.json, weights, "
                                          "Mimi and tokenizer), loadable with --hf-repo DIR.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) folder")
    e.add_argument("--merge", action="store_true", help="merge the LoRA adapters into the weights")
    e.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the last)")
    e.set_defaults(handler=run_export)


def _options(args: argparse.Namespace) -> dict:
    """TrainConfig values: the YAML file's, then the flags given."""
    from openmoshi.training.config import TrainConfig

    keys = set(TrainConfig.keys())
    values: dict = {}
    if args.recipe:
        values.update(_read_yaml(args.recipe, keys))
    values.update({k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})
    return values


def _read_yaml(path: str, keys: set[str]) -> dict:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path} must be a mapping of options, e.g. 'lora_rank: 64'")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = {"output": "run_dir"}.get(name, name)
        if name not in keys:
            raise UsageError(f"--config {path}: unknown option {key!r}; options are the flags' names, e.g. "
                             "lora_rank, steps, batch_size, lr, duration, eval_data")
        out[name] = value
    return out


def run_finetune(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    values = _options(args)
    for required, flag in (("manifest", "MANIFEST.jsonl"), ("run_dir", "-o RUN_DIR")):
        if not values.get(required):
            raise UsageError(f"{flag} is required (on the command line or in --config)")

    from openmoshi.training.config import TrainConfig
    from openmoshi.training.loop import train

    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise UsageError(f"bad option type in --config: {e}") from None
    train(cfg)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Re-runs this command under torchrun with --nproc processes."""
    argv = list(args.argv)
    i = next(i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc="))
    del argv[i:i + (1 if "=" in argv[i] else 2)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "openmoshi", *argv]
    print("openmoshi: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


def run_export(args: argparse.Namespace) -> int:
    from openmoshi.training.export import export_run

    out = export_run(args.run_dir, args.output, args.step, args.merge)
    print(f"openmoshi: wrote {out}; use it with --hf-repo {out}")
    return 0
