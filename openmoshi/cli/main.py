"""The `openmoshi` command line: one entry point, one small `add_*_parser` function per subcommand.

To add a subcommand, write `add_<name>_parser(subparsers)` that creates its parser and sets
`handler=<function(args) -> int>`, and call it from `build_parser`. Handlers stay thin: they check
their inputs, call the library, and import torch and the models lazily so that `--help` is fast.

User errors (a bad file, a bad flag, a missing key) end as one line `openmoshi: error: ...` on
stderr and exit code 2, without a traceback: handlers raise `UsageError`, and the library's
`ValueError`s (`AudioError`, `CheckpointError`, bad shapes) are reported the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from openmoshi import __version__

EXIT_USAGE = 2  # argparse's exit code for bad usage; we use it for every user error
MAX_CODEBOOKS = 32  # codebooks in the released Mimi
DEFAULT_CODEBOOKS = 8  # the codebooks Moshi uses
CODES_KEY = "codes"  # safetensors key of the codes, int64 [B, K, T]


class UsageError(ValueError):
    """A user error found by a handler; reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str):
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str):
    print(f"openmoshi: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------- shared arguments


def _num_codebooks(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= k <= MAX_CODEBOOKS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_CODEBOOKS}, got {k}")
    return k


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None,
        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)",
    )


def _resolve_device(name: str | None):
    from openmoshi.loading.resolve import resolve_device

    return resolve_device(name)


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


def check_cfg_coef(config, cfg_coef: float) -> None:
    """--cfg-coef against a resolved ModelConfig, before the weights are loaded: guidance steers
    between conditions, so it needs a conditioned model."""
    if cfg_coef != 1.0 and not config.lm.conditioners:
        raise UsageError(f"--cfg-coef needs a conditioned model (Hibiki); this {config.model_type} "
                         "model has no conditioners: leave --cfg-coef at 1")


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {path} is not a file")
    return p


def _output_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"output {path} is a directory")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.parent} does not exist")
    return p


# ----------------------------------------------------------------------------- openmoshi codec


def add_codec_parser(subparsers) -> None:
    codec = subparsers.add_parser(
        "codec", help="encode audio to Mimi codes and decode them back",
        description="Mimi codec: audio <-> codes.",
    )
    actions = codec.add_subparsers(dest="codec_command", metavar="{encode,decode}", required=True)

    def common(p: argparse.ArgumentParser, codebooks_help: str) -> None:
        p.add_argument("--mimi-weight", required=True, metavar="PATH",
                       help="Mimi checkpoint (.safetensors)")
        p.add_argument("--num-codebooks", type=_num_codebooks, default=None, metavar="K",
                       help=codebooks_help)
        _add_device_arg(p)

    enc = actions.add_parser(
        "encode",
        help="audio file -> codes",
        description="Encode an audio file (any format FFmpeg reads; resampled to 24 kHz mono) "
        f"to Mimi codes, saved as safetensors under '{CODES_KEY}', int64 [1, K, T] with "
        "T = ceil(samples / 1920).",
    )
    enc.add_argument("input", metavar="IN_AUDIO",
                     help="audio file (wav, flac, mp3, ogg, opus, m4a, ...)")
    enc.add_argument("output", metavar="OUT.safetensors", help="where to write the codes")
    common(enc, f"codebooks to keep, 1 to {MAX_CODEBOOKS} (default {DEFAULT_CODEBOOKS})")
    enc.set_defaults(handler=codec_encode)

    dec = actions.add_parser(
        "decode",
        help="codes -> 24 kHz wav",
        description=f"Decode Mimi codes (safetensors, key '{CODES_KEY}', integer [1, K, T]) to a "
        "24 kHz mono 16-bit wav of T * 1920 samples.",
    )
    dec.add_argument("input", metavar="IN.safetensors",
                     help="codes written by 'openmoshi codec encode'")
    dec.add_argument("output", metavar="OUT.wav", help="where to write the audio")
    common(dec, "codebooks expected in the file (default: as many as it has)")
    dec.set_defaults(handler=codec_decode)


def codec_encode(args: argparse.Namespace) -> int:
    # Cheap checks first, so that a typo fails before torch is even imported.
    source = _existing_file(args.input, "audio file")
    weight = _existing_file(args.mimi_weight, "Mimi checkpoint")
    output = _output_file(args.output)

    import torch
    from safetensors.torch import save_file

    from openmoshi.audio import load_audio
    from openmoshi.loading.checkpoint import load_mimi

    device = _resolve_device(args.device)
    pcm = load_audio(source)[None]  # [1, 1, N]
    num_codebooks = args.num_codebooks or DEFAULT_CODEBOOKS
    mimi = load_mimi(weight, num_codebooks=num_codebooks, device=device)
    with torch.no_grad():
        codes = mimi.encode(pcm.to(device))  # [1, K, T]
    save_file({CODES_KEY: codes.to(torch.int64).cpu().contiguous()}, str(output))
    return 0


def read_codes(path: str):
    """The codes of a file written by `codec encode`, checked: a numpy int64 array [B, K, T].

    Reads with numpy, not torch, so that a bad file is reported at once."""
    import numpy as np
    from safetensors import SafetensorError, safe_open

    _existing_file(path, "codes file")
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            if CODES_KEY not in keys:
                found = ", ".join(sorted(keys)) or "none"
                raise UsageError(f"codes file {path} has no '{CODES_KEY}' tensor (found: {found})")
            meta = f.get_slice(CODES_KEY)
            dtype, shape = meta.get_dtype(), list(meta.get_shape())
            if not dtype.startswith(("I", "U")):  # safetensors dtypes: I64, U8, F32, BF16, BOOL...
                raise UsageError(f"'{CODES_KEY}' in {path} must be integers, got {dtype}")
            codes = f.get_tensor(CODES_KEY)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"cannot read codes file {path}: {e}") from None
    if len(shape) != 3:
        raise UsageError(f"'{CODES_KEY}' in {path} must have shape [B, K, T], got {shape}")
    if shape[2] == 0:
        raise UsageError(f"'{CODES_KEY}' in {path} has no frames (shape {shape})")
    if not 1 <= shape[1] <= MAX_CODEBOOKS:
        raise UsageError(f"'{CODES_KEY}' in {path} has {shape[1]} codebooks, "
                         f"expected 1 to {MAX_CODEBOOKS}")
    if codes.min() < 0:
        raise UsageError(f"'{CODES_KEY}' in {path} has negative values")
    return codes.astype(np.int64)


def codec_decode(args: argparse.Namespace) -> int:
    weight = _existing_file(args.mimi_weight, "Mimi checkpoint")
    output = _output_file(args.output)
    codes = read_codes(args.input)  # [B, K, T]
    batch, k, _ = codes.shape
    if batch != 1:
        raise UsageError(f"'{CODES_KEY}' in {args.input} holds {batch} items; decode writes "
                         "one file, so B must be 1")
    if args.num_codebooks is not None and args.num_codebooks != k:
        raise UsageError(f"--num-codebooks {args.num_codebooks} given, but {args.input} "
                         f"has {k} codebooks")

    import torch

    from openmoshi.audio import SAMPLE_RATE, save_wav
    from openmoshi.loading.checkpoint import load_mimi

    device = _resolve_device(args.device)
    mimi = load_mimi(weight, num_codebooks=k, device=device)
    with torch.no_grad():
        pcm = mimi.decode(torch.from_numpy(codes).to(device))  # [1, 1, T * 1920]
    save_wav(output, pcm[0].float().cpu(), SAMPLE_RATE)  # [1, N]
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> ArgumentParser:
    from openmoshi.cli.bench import add_bench_parser  # light: its handler imports the heavy parts

    parser = ArgumentParser(
        prog="openmoshi", description="openmoshi: Moshi and the Mimi codec in plain PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"openmoshi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_codec_parser(subparsers)
    add_bench_parser(subparsers)
    from openmoshi.cli.infer import add_infer_parser; add_infer_parser(subparsers)  # noqa: E702
    from openmoshi.cli.client import add_client_parser; add_client_parser(subparsers)  # noqa: E702
    from openmoshi.cli.serve import add_serve_parser; add_serve_parser(subparsers)  # noqa: E702
    from openmoshi.cli.quantize import add_quantize_parser; add_quantize_parser(subparsers)  # noqa: E702
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:  # AudioError, CheckpointError, UsageError, bad shapes, I/O
        message = str(e).strip().replace("\n", " ") or type(e).__name__
        _fail(message)
    except KeyboardInterrupt:
        print("openmoshi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
