"""Short versions of the reliability benchmarks (benchmarks/server_soak.py) against a real
`openmoshi serve` subprocess: fuzzed messages crash nothing and leave no slot behind while a normal
conversation keeps its frames; a long conversation on the input clock keeps answering far past the
context window (20 frames here) with flat memory; several conversations lose no frame."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def soak(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/server_soak.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fuzzed_messages_crash_nothing_and_leave_no_slot():
    row = soak("fuzz", "--messages", "3000", "--connections", "2")
    assert row["server_alive"] and row["sent"] >= 3000
    assert row["connections"] > 2  # the server closed fuzzers after too many bad messages; they came back
    assert row["active_after_fuzz"] == 1 and row["active_after_all"] == 0  # no stuck slot
    normal = row["normal"]
    assert not normal.get("errors") and normal["frames_received"] >= normal["frames_sent"] - 2


@pytest.mark.slow
def test_a_long_conversation_keeps_answering_with_flat_memory():
    row = soak("long", "--frames", "2000")
    assert row["server_alive"] and row["frames_received"] >= row["frames_sent"] - 25  # 100x the context
    assert abs(row["rss_change_pct"]) < 5, row["rss_mb"]


@pytest.mark.slow
def test_several_conversations_lose_no_frame():
    row = soak("many", "--conversations", "6", "--seconds", "8")
    assert row["server_alive"] and row["errors"] == 0
    assert row["worst_conversation_short"] <= 2, row
