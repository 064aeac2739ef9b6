"""`openmoshi annotate MANIFEST.jsonl`: write the word-alignment JSON beside each wav of a
fine-tuning manifest, transcribing channel 0 (the model's voice) with a local Whisper."""

from __future__ import annotations

import argparse
import sys

from openmoshi.cli.common import add_device_arg, existing_file

# Kept here as well as in training.annotate, so that `--help` imports neither torch nor whisper.
DEFAULT_MODEL = "medium"


def add_annotate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "annotate", help="write word alignments for fine-tuning data with a local Whisper",
        description="For each wav of a moshi-finetune manifest (.jsonl, one {\"path\": \"a.wav\", "
        "\"duration\": SECONDS} per line), transcribe channel 0 (the model's voice) with Whisper "
        "(whisper-timestamped) and write a.json beside it: {\"alignments\": [[word, [start, end], "
        "\"SPEAKER_MAIN\"], ...]}. Files that have a JSON already are skipped, so an interrupted "
        "run can be restarted. Needs: pip install 'openmoshi[annotate]'.",
    )
    p.add_argument("manifest", metavar="MANIFEST.jsonl", help="the manifest; wav paths are relative to it")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                   help=f"Whisper model: a name (tiny, base, small, medium, large-v3, ...; fetched once "
                   f"into ~/.cache/whisper) or a local checkpoint file (.pt) (default {DEFAULT_MODEL})")
    p.add_argument("--language", default="en", metavar="LANG",
                   help="spoken language, e.g. en or fr, or 'auto' to detect it per file (default en)")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="transcribe again the files that have a JSON already (other keys, such as "
                   "text_conditions, are kept)")
    p.set_defaults(handler=run_annotate)


def run_annotate(args: argparse.Namespace) -> int:
    manifest = existing_file(args.manifest, "manifest")

    from openmoshi.loading.resolve import resolve_device
    from openmoshi.training.annotate import annotate_manifest

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = annotate_manifest(manifest, model=args.model, device=resolve_device(args.device),
                                language=args.language, overwrite=args.overwrite, log=log)
    log(f"done: {summary.annotated} annotated ({summary.words} words), {summary.skipped} skipped, "
        f"in {summary.seconds:.1f} s")
    return 0
