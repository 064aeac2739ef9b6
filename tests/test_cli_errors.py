"""What the command line does with an error and with the library's warnings: a `UserError` (or a
file-system error) is one line and exit code 2; anything else is a bug and keeps its traceback;
library warnings reach stderr once each, as one line."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from openmoshi.audio import AudioError
from openmoshi.cli import annotate
from openmoshi.cli.common import UsageError
from openmoshi.cli.main import main
from openmoshi.errors import UnsupportedError, UserError
from openmoshi.lm.conditioners import ConditionError
from openmoshi.lm.config import ConfigError
from openmoshi.lm.persona import PromptError
from openmoshi.loading.budget import MemoryCheckError
from openmoshi.loading.files import CheckpointError
from openmoshi.loading.resolve import ResolveError, resolve_files
from openmoshi.loading.voices import VoiceError
from openmoshi.training.annotate import ModelError
from openmoshi.training.loop import RunError
from openmoshi.training.manifest import DataError

LEGACY = ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model")


def _handler(monkeypatch, fn) -> None:
    """`openmoshi annotate X` runs `fn(args)` (parsers are built on each call: the name is looked up then)."""
    monkeypatch.setattr(annotate, "run_annotate", fn)


def _raise(error: BaseException):
    def handler(args):
        raise error
    return handler


@pytest.mark.parametrize("kind", [UserError, UsageError, AudioError, ConfigError, ConditionError, PromptError,
                                  CheckpointError, ResolveError, MemoryCheckError, VoiceError, DataError, RunError,
                                  ModelError, UnsupportedError])
def test_user_errors_are_value_errors(kind):
    """Callers that catch ValueError keep catching every kind."""
    assert issubclass(kind, UserError) and issubclass(kind, ValueError)


@pytest.mark.parametrize("error,line", [
    (UsageError("bad flag"), "openmoshi: error: bad flag"),
    (CheckpointError("x.safetensors: unexpected key 'a'\n(is this the right file?)"),
     "openmoshi: error: x.safetensors: unexpected key 'a' (is this the right file?)"),
    (UnsupportedError("fuser method 'cross' is not supported yet"),
     "openmoshi: error: fuser method 'cross' is not supported yet"),
    (FileNotFoundError(2, "No such file or directory", "in.wav"),
     "openmoshi: error: [Errno 2] No such file or directory: 'in.wav'"),
])
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error, line):
    _handler(monkeypatch, _raise(error))
    with pytest.raises(SystemExit) as e:
        main(["annotate", "data.jsonl"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


@pytest.mark.parametrize("error", [ValueError("a shape our own code got wrong"), KeyError("slot"),
                                   TypeError("unsupported operand"), RuntimeError("CUDA error: illegal address")])
def test_a_bug_is_not_swallowed(monkeypatch, capsys, error):
    """A plain ValueError (or any other exception) is a bug, not a user error: it leaves main as
    it was raised."""
    _handler(monkeypatch, _raise(error))
    with pytest.raises(type(error)) as e:
        main(["annotate", "data.jsonl"])
    assert e.value is error
    assert "openmoshi: error" not in capsys.readouterr().err


def test_a_bug_ends_with_its_traceback_and_exit_1():
    script = textwrap.dedent("""
        import sys
        from openmoshi.cli import annotate, main

        def handler(args):
            {}["slot"]  # a bug deep in a handler

        annotate.run_annotate = handler
        sys.exit(main.main(["annotate", "data.jsonl"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "KeyError: 'slot'" in proc.stderr and "in handler" in proc.stderr
    assert "openmoshi: error" not in proc.stderr


def _legacy_folder(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    for name in LEGACY:
        (folder / name).touch()
    return folder


def test_a_library_warning_is_one_line_once(monkeypatch, capsys, tmp_path):
    """resolve's warning (a folder without config.json) reaches stderr once, as one line, even when
    the root logger has a handler of its own; the loggers are as they were afterwards."""
    folder = _legacy_folder(tmp_path)

    def handler(args):
        resolve_files(str(folder))
        return 0

    _handler(monkeypatch, handler)
    library = logging.getLogger("openmoshi")
    before = (list(library.handlers), library.level, library.propagate)
    stray = logging.StreamHandler(sys.stderr)  # as a library that calls logging.basicConfig() leaves it
    logging.getLogger().addHandler(stray)
    try:
        assert main(["annotate", "data.jsonl"]) == 0
    finally:
        logging.getLogger().removeHandler(stray)
    err = capsys.readouterr().err
    assert err == f"openmoshi: warning: {folder} has no config.json: assuming the legacy Moshi 7B\n"
    assert (list(library.handlers), library.level, library.propagate) == before


def test_a_training_run_says_what_it_does_and_events_stay_quiet(monkeypatch, capsys):
    """INFO lines of a training run are shown (`openmoshi: ...`); other INFO records are not, and a
    warning with an exception and fields is still one line."""
    def handler(args):
        logging.getLogger("openmoshi.training.loop").info("resuming run at step 4")
        logging.getLogger("openmoshi.accel.self_check").info("fast_paths_checked", extra={"fields": {"error": 0.0}})
        try:
            raise RuntimeError("capture failed\nin a second line")
        except RuntimeError:
            logging.getLogger("openmoshi.accel.cuda_graph").warning("cuda_graph_capture_failed", exc_info=True,
                                                                    extra={"fields": {"fn": "step"}})
        return 0

    _handler(monkeypatch, handler)
    assert main(["annotate", "data.jsonl"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "openmoshi: resuming run at step 4",
        "openmoshi: warning: cuda_graph_capture_failed  fn=step (RuntimeError: capture failed in a second line)",
    ]


def test_a_real_command_warns_then_fails_in_one_line_each(tmp_path):
    """The whole program: a folder without config.json (one warning line), whose weights are empty
    files (one error line)."""
    folder = _legacy_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "openmoshi", "quantize", "--mode", "int8", "-o",
                           str(tmp_path / "q.safetensors"), "--hf-repo", str(folder), "--skip-memory-check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    warned = [line for line in lines if "has no config.json" in line]
    assert len(warned) == 1 and warned[0].startswith("openmoshi: warning: "), lines
    assert lines[-1].startswith("openmoshi: error: ") and "is empty or truncated" in lines[-1], lines
    assert "Traceback" not in proc.stderr
