"""The latency a client hears (openmoshi.serving.latency), and the benchmark that measures it on the
official server and ours in one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openmoshi.serving.latency import FRAME_SIZE, LatencyMeter

ROOT = Path(__file__).resolve().parents[1]
F = FRAME_SIZE


def play(answer_after, frames: int = 30) -> LatencyMeter:
    """A client sending one frame every 80 ms to a server that returns output frame k once it has
    input frame k + 1 (the first step answers nothing), `answer_after(k)` seconds later."""
    meter = LatencyMeter()
    events = []
    for i in range(frames):
        events.append((i * 0.08, "sent", (i + 1) * F))
        k = i - 1  # input frames 0..i are in: output frame i - 1 can be made
        if k >= 0:
            events.append((i * 0.08 + answer_after(k), "received", (k + 1) * F))
    for at, kind, total in sorted(events):
        getattr(meter, kind)(total, at)
    return meter


def test_a_server_answering_after_a_fixed_delay_measures_that_delay():
    s = play(lambda k: 0.063).summary()
    assert s["chunks"] == 29 and s["p50_ms"] == s["p90_ms"] == 63.0
    assert s["first_third_p90_ms"] == s["last_third_p90_ms"] == 63.0


def test_a_server_falling_behind_shows_a_growing_last_third():
    s = play(lambda k: 0.05 + 0.02 * k).summary()  # 20 ms more every frame: slower than real time
    assert s["last_third_p90_ms"] > s["first_third_p90_ms"] + 300
    assert s["p50_ms"] == pytest.approx(50 + 20 * 14, abs=1)


def test_output_that_needs_input_not_sent_yet_is_not_counted_and_chunks_may_split():
    meter = LatencyMeter()
    meter.sent(F, 0.0)
    meter.sent(2 * F, 0.08)
    meter.received(F // 2, 0.1)  # half a frame: needs input up to 1.5 frames, sent at 0.08
    meter.received(F, 0.12)  # needs 2 frames: sent at 0.08
    meter.received(2 * F, 0.2)  # needs 3 frames: never sent
    assert np.allclose(meter.latencies(), [0.02, 0.04])


@pytest.mark.slow
def test_the_benchmark_measures_both_servers_in_one_run(tmp_path):
    """benchmarks/latency.py on the tiny LM with a real-size Mimi: the official server (its own code,
    on CPU) and ours each answer, and both rows carry the client-side numbers."""
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, "benchmarks/latency.py", "--lm", "tiny", "--seconds", "2",
                           "--conversations", "1,2", "--threads", "1", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["server"], r["conversations"]) for r in rows] == [("official", 1), ("openmoshi", 1), ("openmoshi", 2)]
    for r in rows:
        for each in r["each"]:
            assert each["chunks"] > 5 and not each["errors"] and each["p50_ms"] > 0, r
