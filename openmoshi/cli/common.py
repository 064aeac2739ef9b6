"""What every subcommand shares: the user-error type, argparse types, file checks, the model flags.

Imported by every `cli` module and by nothing outside `cli`; it imports nothing heavy (no torch), so
that `openmoshi --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from openmoshi.errors import UserError
from openmoshi.loading.resolve import DEFAULT_REPO, DTYPES, ModelFiles, resolve_files
from openmoshi.memory import available_bytes

EXIT_USAGE = 2  # argparse's exit code for bad usage; we use it for every user error


class UsageError(UserError):
    """A user error found by a handler (a flag, a file); reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- argparse types


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


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
    add_memory_flag(g)


def add_memory_flag(parser) -> None:
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="start even when the model does not seem to fit the memory available")


def resolve_model(args: argparse.Namespace, before_download=None) -> ModelFiles:
    """The files named by `add_model_args` flags, fetched and checked; `before_download(config)`
    runs once the config is known, before any weight is fetched (see `fits`)."""
    return resolve_files(hf_repo=args.hf_repo, moshi_weight=args.moshi_weight,
                         mimi_weight=args.mimi_weight, tokenizer=args.tokenizer,
                         config_path=args.config_path, lora_weight=args.lora_weight,
                         before_download=before_download)


# ----------------------------------------------------------------------------- fitting the machine

CPU_PARAMS_WARNING = 2e9  # an LM this large is far from real time on a CPU
CPU_7B_FRAME_SECONDS = 2.6  # one 7B LM step, bfloat16, 2-core CPU (benchmarks/RESULTS.md)


def fits(args: argparse.Namespace, what: str, device, dtype, quantize: str | None = None, sessions: int = 0,
         cfg_coef: float = 1.0, mimi: bool | str = True, extra: dict | None = None, ways: list[str] = ()):
    """`before_download` for `resolve_model`: checks that the LM (in `dtype`, `quantize`, or the
    format of a local --moshi-weight), the states of `sessions` conversations, Mimi and `extra`
    (what -> bytes) fit the memory of `device`, and warns that a 7B on a CPU is not real time.
    `mimi`: True with the CPU fast path on a CPU (as serve and infer run), "reference" without it,
    False for no Mimi. `ways`: the command's own ways out, said after the common ones."""
    import torch

    from openmoshi.loading import budget

    def check(config) -> None:
        check_cfg_coef(config, cfg_coef)  # before sizing a guided state the model cannot have
        lm = config.lm
        given = getattr(args, "moshi_weight", None)
        path = given if given and Path(str(given)).is_file() else None
        q = quantize or ("int8" if path is None and config.moshi_name.endswith(".q8.safetensors") else None)
        weights = budget.meta_lm(lm, dtype, q, path)
        params = sum(p.numel() for p in weights.parameters()) + sum(
            m.in_dim * m.scale.shape[0] for m in weights.modules() if hasattr(m, "qweight"))
        if torch.device(device).type == "cpu" and params > CPU_PARAMS_WARNING:
            print(f"openmoshi: warning: a {params / 1e9:.1f}B-parameter LM will not run in real time on a CPU "
                  f"(one 80 ms frame takes about {CPU_7B_FRAME_SECONDS:.0f} s for the 7B on 2 cores, see "
                  "benchmarks/RESULTS.md): use a CUDA GPU for conversations", file=sys.stderr, flush=True)
        label = getattr(weights, "quantization", None)
        parts = {f"LM weights ({label[0] if label else str(dtype).removeprefix('torch.')})":
                 sum(t.numel() * t.element_size() for t in [*weights.parameters(), *weights.buffers()])}
        per = budget.lm_state_bytes(lm, dtype, 1, cfg_coef) if sessions else 0
        if sessions:
            parts[f"states of {sessions} conversation{'s' if sessions > 1 else ''}"] = per * sessions
        if mimi:
            fast = mimi is True and torch.device(device).type == "cpu"
            parts["Mimi" + (" (and its CPU fast copy)" if fast else "")] = budget.mimi_bytes(fast_copy=fast)
        parts.update(extra or {})
        need = budget.Need(parts)
        ways_out = []
        if dtype == torch.float32:
            ways_out.append("--dtype bfloat16")
        if not label:
            ways_out.append("--quantize int8 or int4 (or a file written by 'openmoshi quantize')")
        free = available_bytes(device)
        if sessions > 1 and free is not None:
            key = next(k for k in parts if k.startswith("states of"))
            fit = next((k for k in range(sessions - 1, 0, -1)
                        if budget.Need({**parts, key: per * k}).total <= free), 0)
            if fit:
                ways_out.append(f"--max-sessions {fit}")
        budget.check(need, device, what, ways_out + list(ways), args.skip_memory_check)

    return check


def check_cfg_coef(config, cfg_coef: float) -> None:
    """--cfg-coef against a resolved ModelConfig, before the weights are loaded: guidance steers
    between conditions, so it needs a conditioned model."""
    if cfg_coef != 1.0 and not config.lm.conditioners:
        raise UsageError(f"--cfg-coef needs a conditioned model (Hibiki); this {config.model_type} "
                         "model has no conditioners: leave --cfg-coef at 1")
