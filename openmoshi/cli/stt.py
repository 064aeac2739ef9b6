"""`openmoshi stt IN.wav [MORE.wav ...]`: timed words from a Kyutai STT model (see openmoshi.inference.stt).

Prints, per input, one line per word: its start and stop in seconds and its text (a stop of "-"
when the model has not ended the word); with several inputs each block starts with the input's
name. `--json` prints one JSON object per input instead (a list of them for several), `--prs` adds
each step's pause probabilities (each extra head's probability of its first class, as
moshi-server's `Step` messages). Several inputs run as one batch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from openmoshi.cli.common import UsageError, add_model_args, fits, positive_int, resolve_model
from openmoshi.loading.resolve import resolve_device, resolve_dtype

DEFAULT_STT_REPO = "kyutai/stt-1b-en_fr"


def add_stt_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "stt", help="speech to text with a Kyutai STT model: timed words",
        description="Transcribe audio files with a Kyutai STT model (kyutai/stt-1b-en_fr, kyutai/stt-2.6b-en): "
        "words with their start and stop times, as moshi-server tells them. Inputs in any format FFmpeg "
        "reads, at any rate; several inputs run as one batch. Decoding is greedy.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files (wav, flac, mp3, ogg, ...)")
    p.add_argument("--json", action="store_true", help="print JSON: text, words (text, start, stop) per input")
    p.add_argument("--prs", action="store_true",
                   help="also print each step's pause probabilities (the extra heads', as moshi-server's Step)")
    p.add_argument("--asr-delay-tokens", type=positive_int, default=None, metavar="N",
                   help="steps between audio and text, as moshi-server's asr_delay_in_tokens (default: "
                        "stt_config's audio_delay_seconds x 12.5, rounded)")
    add_model_args(p)
    p.set_defaults(handler=stt, hf_repo=DEFAULT_STT_REPO)


def _result_dict(result, source: str, prs: bool) -> dict:
    out = {"input": source, "text": result.text, "words": [asdict(w) for w in result.words]}
    if prs:
        out["prs"] = [{"step": i + 1, "time": result.timing.seconds(i + 1), "prs": [round(x, 6) for x in p]}
                      for i, p in enumerate(result.prs or [])]
    return out


def _print_text(result, source: str | None, prs: bool) -> None:
    if source is not None:
        print(f"== {source}")
    for w in result.words:
        stop = "-" if w.stop is None else f"{w.stop:.2f}"
        print(f"{w.start:7.2f} {stop:>7}  {w.text}")
    if prs:
        for i, p in enumerate(result.prs or []):
            print(f"step {i + 1:5d} {result.timing.seconds(i + 1):7.2f} s  prs " + " ".join(f"{x:.4f}" for x in p))


def stt(args: argparse.Namespace) -> int:
    for x in args.inputs:
        if not Path(x).is_file():
            raise UsageError(f"input {x} {'is not a file' if Path(x).exists() else 'does not exist'}")

    from openmoshi.engine.speed import SpeedConfig
    from openmoshi.engine.startup import start
    from openmoshi.inference.stt import check_stt, transcribe

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check = fits(args, "openmoshi stt", device, dtype, args.quantize, sessions=len(args.inputs))

    def before_download(config) -> None:
        check_stt(config)  # before any weight is fetched: one line, not a download
        check(config)

    files = resolve_model(args, before_download)
    model, speed = start(files, device, dtype, args.quantize, SpeedConfig())
    results = transcribe(model, list(args.inputs), args.asr_delay_tokens, speed)
    if args.json:
        data = [_result_dict(r, x, args.prs) for r, x in zip(results, args.inputs)]
        print(json.dumps(data[0] if len(data) == 1 else data, ensure_ascii=False, indent=2))
    else:
        for r, x in zip(results, args.inputs):
            _print_text(r, x if len(results) > 1 else None, args.prs)
    return 0
