"""The `openmoshi` command line: one entry point, one module per subcommand.

To add a subcommand, write a module with `add_<name>_parser(subparsers)` that creates its parser
and sets `handler=<function(args) -> int>`, and list it in `build_parser`. Handlers stay thin: they
check their inputs, call the library, and import torch and the models lazily so that `--help` is
fast. What they share is in `cli.common`.

Errors. What a user can fix is a `UserError` (`openmoshi.errors`): handlers raise `UsageError`,
the library its own kinds (`AudioError`, `CheckpointError`, `ConfigError`, ...). Those, file-system
errors (`OSError`) and running out of memory end as one line `openmoshi: error: ...` on stderr and
exit code 2, without a traceback. Anything else is a bug: it goes on with its traceback (exit 1).

Logging. Library code logs what a user should know, and never prints it. While a command runs
(but `serve`, which sets up its own log lines), warnings of the `openmoshi.*` loggers and the
progress of a fine-tuning run (`openmoshi.training`, INFO) go to stderr one line each:
`openmoshi: warning: ...`, `openmoshi: ...`. What a command prints itself (results, progress bars)
is its own output.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from contextlib import contextmanager, nullcontext

from openmoshi import __version__
from openmoshi.cli import annotate, bench, client, codec, finetune, infer, quantize, serve, stt, tts
from openmoshi.cli.common import EXIT_USAGE
from openmoshi.errors import UserError

LIBRARY_LOGGER = "openmoshi"
SHOWN_INFO = ("openmoshi.training",)  # loggers whose INFO lines a command shows: a training run's progress


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str):
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str):
    print(f"openmoshi: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").strip()


class _StderrLines(logging.Handler):
    """Each record as one line `openmoshi: [level: ]message` on the current `sys.stderr` (looked up
    for each record: tests and callers replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            fields = getattr(record, "fields", None)  # a structured event's key/values
            if fields:
                text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            sys.stderr.write(f"openmoshi: {level}{_one_line(text)}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def library_logging():
    """While a command runs, the library's log records reach the user (see the module doc); the
    loggers are as they were afterwards."""
    handler = _StderrLines()
    loggers = [logging.getLogger(name) for name in (LIBRARY_LOGGER, *SHOWN_INFO)]
    library = loggers[0]
    levels, propagate = [logger.level for logger in loggers], library.propagate
    library.addHandler(handler)
    library.propagate = False  # once, in this form, whatever handlers the root logger has
    library.setLevel(logging.WARNING)
    for logger in loggers[1:]:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.propagate = propagate
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="openmoshi", description="openmoshi: Moshi and the Mimi codec in plain PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"openmoshi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    codec.add_codec_parser(subparsers)
    bench.add_bench_parser(subparsers)
    infer.add_infer_parser(subparsers)
    tts.add_tts_parser(subparsers)
    stt.add_stt_parser(subparsers)
    client.add_client_parser(subparsers)
    serve.add_serve_parser(subparsers)
    quantize.add_quantize_parser(subparsers)
    finetune.add_finetune_parser(subparsers)
    annotate.add_annotate_parser(subparsers)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    argv = finetune.route(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a handler re-runs (finetune --nproc under torchrun)
    with nullcontext() if args.command == "serve" else library_logging():
        try:
            return args.handler(args)
        except (UserError, OSError) as e:  # UsageError, AudioError, CheckpointError, ...; files, I/O
            _fail(_one_line(str(e)) or type(e).__name__)
        except (RuntimeError, MemoryError) as e:  # the allocator gave up (torch.OutOfMemoryError is a RuntimeError)
            if not _out_of_memory(e):
                raise
            wanted = re.search(r"tried to allocate (\d+) bytes", str(e))
            size = f" (asking for {int(wanted.group(1)) / 1e6:.0f} MB more)" if wanted else ""
            _fail(f"ran out of memory{size}: this machine cannot hold what the command needs; try --dtype "
                  "bfloat16, --quantize int8 or int4, a smaller model or batch, or fewer sessions")
        except KeyboardInterrupt:
            print("openmoshi: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
