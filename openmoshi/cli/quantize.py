"""`openmoshi quantize --mode int8|int4 -o OUT.safetensors`: write a weight-only quantized LM
checkpoint once (see openmoshi.accel.quantize), then load the small file anywhere a model is loaded:
`openmoshi serve --moshi-weight OUT.safetensors`, with the config of the same --hf-repo.

Only the LM is read (no Mimi, no text tokenizer), in the dtype of its file and on the CPU unless
--device says otherwise, and it is quantized one layer at a time: the peak memory is about the size
of the float weights (15.4 GB for the 7B in bfloat16). A LoRA adapter (--lora-weight, or the one
the repo's config names) is merged into the float weights first, since an adapter cannot be added to
quantized weights; the file records which one it holds. OUT is written beside itself and renamed,
so it is whole or absent.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from openmoshi.cli.common import UsageError, add_memory_flag, add_model_args, fits, output_file
from openmoshi.loading.resolve import DTYPES, resolve_device, resolve_files

# As openmoshi.accel.quantize.MODES, GROUP_SIZES and DEFAULT_GROUP_SIZE (not imported: it imports torch,
# and building the parser must stay light).
MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128


def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="write an int8/int4 weight-only quantized LM checkpoint",
        description="Quantize the LM's transformer layers (weight-only int8 per output row, or int4 "
                    "per group of inputs) and save them as one safetensors file, about half (int8) or "
                    "a third (int4) of the bfloat16 size. Load it with --moshi-weight OUT.safetensors "
                    "and the config it was made with (same --hf-repo or --config-path).")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                   help="where to write the quantized checkpoint")
    q = p.add_argument_group("quantization")
    q.add_argument("--mode", required=True, choices=MODES,
                   help="int8: one scale per output row; int4: a scale and offset per group of inputs")
    q.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES, metavar="N",
                   help=f"int4 only: inputs per group, one of {', '.join(map(str, GROUP_SIZES))} "
                        f"(default {DEFAULT_GROUP_SIZE}); it must divide every layer's input width")
    q.add_argument("--device", default=None,
                   help="torch device to quantize on (default cpu, where the float weights must fit "
                        "in memory; a GPU with room for them is faster)")
    q.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the weights kept in float (embeddings, norms, output heads) and of a "
                        "LoRA merge (default: that of the input file)")
    add_model_args(p, lm_only=True)
    add_memory_flag(q)
    p.set_defaults(handler=quantize)


def quantize(args: argparse.Namespace) -> int:
    output = output_file(args.output)
    if args.mode == "int8" and args.group_size is not None:
        raise UsageError("--group-size is for int4 only: int8 has one scale per output row")
    group_size = args.group_size or DEFAULT_GROUP_SIZE

    import torch

    from openmoshi.loading.files import read_header
    from openmoshi.loading.formats.quantized import FORMAT_KEY, save_quantized_lm
    from openmoshi.loading.lm import load_lm

    device = resolve_device(args.device or "cpu")
    estimate_dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16  # the released files' dtype
    files = resolve_files(args.hf_repo, args.moshi_weight, config_path=args.config_path,
                          lora_weight=args.lora_weight, lm_only=True,
                          before_download=fits(args, "openmoshi quantize", device, estimate_dtype, args.mode, mimi=False))
    source, cfg = files.moshi_weight, files.config
    if output.resolve() == source.resolve() or (output.exists() and output.samefile(source)):
        raise UsageError(f"output {args.output} is the input checkpoint: write the quantized one to another file")
    header = read_header(source)  # an unreadable file fails here, with what is wrong with it
    saved = header.metadata.get(FORMAT_KEY)
    if saved is not None:
        raise UsageError(f"{source} is already quantized ({saved}): quantize the float checkpoint instead")
    if args.mode == "int4":
        _check_group_size(cfg.lm, group_size)

    dtype = getattr(torch, args.dtype) if args.dtype else (header.float_dtype or torch.bfloat16)
    lora = files.lora_weight
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"openmoshi: reading {source} ({_size(source.stat().st_size)}) as {dtype_name} on {device}"
          + (f", merging the LoRA adapter {lora}" if lora else ""), file=sys.stderr, flush=True)
    start = time.perf_counter()
    # Each layer linear is quantized as it is read (after merging the LoRA adapter, if any).
    lm = load_lm(source, cfg.lm, device, dtype, lora=lora, lora_scaling=cfg.lora_scaling, quantize=args.mode,
                 group_size=group_size)
    save_quantized_lm(lm, output, cfg.lm, source=source.name, lora=lora.name if lora else None)
    what = args.mode if args.mode == "int8" else f"int4, groups of {group_size}"
    print(f"openmoshi: wrote {output} ({_size(output.stat().st_size)}, {what}) in "
          f"{time.perf_counter() - start:.1f} s")
    flags = _use_flags(args, output)
    print(f"Use it with:\n  openmoshi serve {flags}\n  openmoshi infer INPUT.wav -o OUTPUT.wav {flags}")
    return 0


def _check_group_size(lm_cfg, group_size: int) -> None:
    """int4 quantizes a layer only if the group size divides its input width: refuse to leave
    layers in float silently."""
    import torch

    from openmoshi.accel.quantize import unquantizable_widths
    from openmoshi.lm.model import LMModel

    with torch.device("meta"):
        model = LMModel(lm_cfg)  # shapes only, no memory
    bad = unquantizable_widths(model, group_size)
    if not bad:
        return
    name, width = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    fits = [g for g in GROUP_SIZES if not unquantizable_widths(model, g)]
    hint = (f"use --group-size {' or '.join(map(str, fits))}" if fits else
            f"none of {', '.join(map(str, GROUP_SIZES))} divides every width of this model: use --mode int8")
    raise UsageError(f"--group-size {group_size} does not divide the input width {width} of {name}{more}; {hint}")


def _use_flags(args: argparse.Namespace, output: Path) -> str:
    """The model flags that load the new file with the config it was made with."""
    flags = ["--hf-repo", args.hf_repo] if args.hf_repo else []
    if args.config_path:
        flags += ["--config-path", args.config_path]
    flags += ["--moshi-weight", str(output)]
    return " ".join(shlex.quote(f) for f in flags)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
