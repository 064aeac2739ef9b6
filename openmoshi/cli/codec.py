"""`openmoshi codec encode|decode`: the Mimi codec alone, audio file <-> codes file."""

from __future__ import annotations

import argparse

from openmoshi.cli.common import UsageError, add_device_arg, add_memory_flag, existing_file, output_file
from openmoshi.loading.resolve import resolve_device

MAX_CODEBOOKS = 32  # codebooks in the released Mimi
DEFAULT_CODEBOOKS = 8  # the codebooks Moshi uses
CODES_KEY = "codes"  # safetensors key of the codes, int64 [B, K, T]


def _num_codebooks(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= k <= MAX_CODEBOOKS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_CODEBOOKS}, got {k}")
    return k


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
        add_device_arg(p)
        add_memory_flag(p)

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
    source = existing_file(args.input, "audio file")
    weight = existing_file(args.mimi_weight, "Mimi checkpoint")
    output = output_file(args.output)

    import torch
    from safetensors.torch import save_file

    from openmoshi.audio import load_audio
    from openmoshi.loading.mimi import load_mimi

    device = resolve_device(args.device)
    pcm = load_audio(source)[None]  # [1, 1, N]
    _check_memory(args, device, pcm.shape[-1])
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

    existing_file(path, "codes file")
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
    weight = existing_file(args.mimi_weight, "Mimi checkpoint")
    output = output_file(args.output)
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
    from openmoshi.loading.mimi import load_mimi
    from openmoshi.mimi.config import MimiConfig

    bins = MimiConfig.default().quantizer.bins  # the Mimi load_mimi builds
    if codes.max() >= bins:
        raise UsageError(f"'{CODES_KEY}' in {args.input} has values up to {codes.max()}; Mimi's codebooks "
                         f"have {bins} entries (0 to {bins - 1})")

    device = resolve_device(args.device)
    _check_memory(args, device, codes.shape[-1] * 1920)
    mimi = load_mimi(weight, num_codebooks=k, device=device)
    with torch.no_grad():
        pcm = mimi.decode(torch.from_numpy(codes).to(device))  # [1, 1, T * 1920]
    save_wav(output, pcm[0].float().cpu(), SAMPLE_RATE)  # [1, N]
    return 0


def _check_memory(args: argparse.Namespace, device, samples: int) -> None:
    """Mimi and the activations of a whole-signal pass, about 2 kB per sample (measured on a CPU)."""
    from openmoshi.loading import budget

    need = budget.Need({"Mimi": budget.mimi_bytes(streaming=False),
                        f"activations for {samples / 24000:.0f} s": 2048 * samples})
    budget.check(need, device, f"openmoshi codec {args.codec_command}", ["a shorter file"], args.skip_memory_check)
