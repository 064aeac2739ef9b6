"""What every subcommand shares: the user-error type, argparse types, file checks, the model flags.

Imported by every `cli` module and by nothing outside `cli`; it imports nothing heavy (no torch), so
that `openmoshi --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from openmoshi.loading.resolve import DEFAULT_REPO, DTYPES, ModelFiles, resolve_files

EXIT_USAGE = 2  # argparse's exit code for bad usage; we use it for every user error


class UsageError(ValueError):
    """A user error found by a handler; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- argparse types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None,
        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)",
    )


# ----------------------------------------------------------------------------- files


def existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {path} is not a file")
    return p


def output_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"output {path} is a directory")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.parent} does not exist")
    return p


# ----------------------------------------------------------------------------- the model flags


def add_model_args(parser: argparse.ArgumentParser, lm_only: bool = False) -> None:
    """The model-selection flags shared by every command that runs the LM. `lm_only`: the flags of
    a command that reads the LM alone: no --mimi-weight, --tokenizer, --quantize, and it adds its
    own --device and --dtype."""
    g = parser.add_argument_group("model")
    g.add_argument("--hf-repo", default=DEFAULT_REPO, metavar="REPO",
                   help=f"Hugging Face repo id, or a local folder with the same files (default {DEFAULT_REPO})")
    for flag, what in (("--moshi-weight", "LM weights (model.safetensors, model.q8.safetensors or a file "
                                          "written by 'openmoshi quantize')"),
                       ("--mimi-weight", "Mimi weights (tokenizer-*.safetensors)"),
                       ("--tokenizer", "SentencePiece text tokenizer (.model)"),
                       ("--config-path", "config.json (default: the repo's, or Moshi 7B if it has none)"),
                       ("--lora-weight", "LoRA adapter weights (.safetensors)")):
        if lm_only and flag in ("--mimi-weight", "--tokenizer"):
            continue
        g.add_argument(flag, default=None, metavar="PATH",
                       help=f"{what}: a local path, file://PATH or hf://OWNER/REPO/FILE (default: from --hf-repo)")
    if lm_only:
        return
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="weight-only quantization of the LM's transformer layers (a file written by "
                        "'openmoshi quantize' is quantized already: leave it out or give its mode)")


def resolve_model(args: argparse.Namespace) -> ModelFiles:
    """The files named by `add_model_args` flags, fetched and checked."""
    return resolve_files(hf_repo=args.hf_repo, moshi_weight=args.moshi_weight,
                         mimi_weight=args.mimi_weight, tokenizer=args.tokenizer,
                         config_path=args.config_path, lora_weight=args.lora_weight)


def check_cfg_coef(config, cfg_coef: float) -> None:
    """--cfg-coef against a resolved ModelConfig, before the weights are loaded: guidance steers
    between conditions, so it needs a conditioned model."""
    if cfg_coef != 1.0 and not config.lm.conditioners:
        raise UsageError(f"--cfg-coef needs a conditioned model (Hibiki); this {config.model_type} "
                         "model has no conditioners: leave --cfg-coef at 1")
