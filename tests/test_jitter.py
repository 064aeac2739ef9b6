"""The speaker's adaptive jitter buffer (openmoshi/serving/jitter.py): hold, raise on underrun, lower
while quiet, trim a surplus, cap; and the web UI's copy of it (web/jitter.js) and of the latency
meter (web/latency.js) give the same numbers as the Python ones, run by node (skipped without it)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from openmoshi.serving.jitter import FRAME_SIZE, JitterBuffer
from openmoshi.serving.latency import LatencyMeter

WEB = Path(__file__).resolve().parent.parent / "openmoshi" / "serving" / "web"
MS = 24  # samples per ms at 24 kHz
F = FRAME_SIZE


def run(buffer: JitterBuffer, arrivals: list[tuple[int, np.ndarray]], until: int, block: int = 128,
        depths: list[int] | None = None) -> np.ndarray:
    """Plays `arrivals` ((clock when it arrives, chunk), in order; taken from the list as they arrive)
    through `buffer`, pulling `block` samples at a time until the clock reaches `until`; returns what
    the speaker played, and appends the queue's depth after each pull to `depths`."""
    out = []
    while buffer.clock < until:
        while arrivals and arrivals[0][0] <= buffer.clock:
            buffer.push(arrivals.pop(0)[1], tag=buffer.pushed)
        out.append(buffer.pull(block))
        if depths is not None:
            depths.append(buffer.queued)
    return np.concatenate(out)


def bursts(seconds: float, late=lambda k: 0) -> list[tuple[int, np.ndarray]]:
    """One 80 ms frame every 80 ms, frame k `late(k)` samples late, each frame filled with k + 1."""
    n = int(seconds * 12.5)
    return [(k * F + late(k), np.full(F, k + 1, np.float32)) for k in range(n)]


def test_audio_waits_the_least_hold_then_plays_in_order_without_gaps():
    b = JitterBuffer(0.02, 0.32)
    played = run(b, bursts(2.0), until=2 * 24000)
    first = int(np.argmax(played != 0))
    assert first == 20 * MS  # the first sample waited 20 ms
    body = played[first : first + 24 * F]
    assert np.array_equal(body, np.repeat(np.arange(1, 25), F).astype(np.float32))  # in order, nothing lost
    assert b.underruns == 0 and b.dropped == 0 and b.target == 20 * MS
    # Each chunk's last sample waited the hold plus the chunk's own length: what heard latency adds.
    assert {waited for _, waited in b.take_started()} == {20 * MS + F - 1}


def test_an_underrun_raises_the_hold_and_quiet_time_lowers_it_down_to_the_least():
    b = JitterBuffer(0.02, 0.32)
    late = lambda k: 50 * MS if k == 10 else 0  # noqa: E731 - one frame 50 ms late
    run(b, bursts(2.0, late), until=2 * 24000)
    assert b.underruns == 1 and b.target == 40 * MS
    b2 = JitterBuffer(0.02, 0.32)
    run(b2, bursts(12.0, late), until=12 * 24000)
    assert b2.underruns == 1 and b2.target == 20 * MS  # two steps of 10 ms, one per 5 s without underrun


def test_the_hold_is_bounded_by_the_cap_less_one_frame():
    b = JitterBuffer(0.02, 0.16)
    # Every other frame 60 ms late: underruns until the hold covers it, never beyond 160 - 80 ms.
    run(b, bursts(3.0, lambda k: 60 * MS * (k % 2)), until=3 * 24000)
    assert b.ceiling == 80 * MS and 40 * MS <= b.target <= b.ceiling
    b = JitterBuffer(0.02, 0.16)
    run(b, bursts(6.0, lambda k: 300 * MS * (k % 10 == 9)), until=6 * 24000)  # later than any hold allowed
    assert b.target == b.ceiling and b.underruns >= 5


def test_a_surplus_after_a_stall_is_trimmed_back_to_the_hold():
    """A stall, then the three frames it held come at once (frame 10 190 ms late): the queue is
    some 200 ms deeper than the hold needs (under the cap), and one trim window later it is back."""
    stall = lambda k: (12 * F + 30 * MS - k * F) if 10 <= k <= 12 else 0  # noqa: E731
    arrivals = bursts(8.0, stall)
    b = JitterBuffer(0.02, 0.32)
    depths: list[int] = []
    run(b, arrivals, until=int(3.9 * 24000), depths=depths)
    assert b.underruns == 1 and b.target == 40 * MS  # the stall itself
    assert min(depths[-300:]) > 200 * MS  # still deep: no trim in the window of the underrun (0-2 s)
    run(b, arrivals, until=6 * 24000)  # the window 2-4 s saw the surplus
    assert 150 * MS < b.dropped < 240 * MS  # the surplus, not more
    depths = []
    run(b, arrivals, until=8 * 24000, depths=depths)
    assert b.target - 1 <= min(depths) <= b.target + 10 * MS and b.underruns == 1


def test_far_too_much_queued_drops_the_oldest_down_to_the_hold_plus_a_frame():
    b = JitterBuffer(0.08, 0.32)
    assert not b.pull(480).any()  # nothing yet: silence
    b.push(np.arange(1, 24001, dtype=np.float32))  # 1 s at once
    assert b.dropped == 24000 - (80 * MS + F) and b.queued == 80 * MS + F
    out = b.pull(80 * MS + 480)  # the hold of 80 ms, then the newest audio
    assert not out[: 80 * MS].any() and out[80 * MS] == 24000 - (80 * MS + F) + 1


def test_a_drop_while_playing_fades_instead_of_jumping():
    b = JitterBuffer(0.0, 0.2)
    b.push(np.zeros(F, np.float32))
    b.pull(480)  # playing
    b.push(np.ones(10 * F, np.float32))  # over the cap: the oldest (zeros) go, fading into ones
    out = b.pull(480)
    assert out[0] < 0.05 and np.all(np.diff(out) >= 0) and out[-1] == 1.0


# ------------------------------------------------------------------------ the web UI's copies (node)

NODE_RUNNER = r"""
import { JitterBuffer } from "./jitter.mjs";
import { LatencyMeter } from "./latency.mjs";
import { readFileSync } from "node:fs";
const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const f32 = (b64) => new Float32Array(Uint8Array.from(Buffer.from(b64, "base64")).buffer);
const b = new JitterBuffer(spec.least, spec.most, 24000);
const out = [], targets = [];
for (const op of spec.ops) {
  if (op[0] === "push") b.push(f32(op[1]), op[2]);
  else { const block = new Float32Array(op[1]); b.pull(block); out.push(...block); targets.push(b.target); }
}
const m = new LatencyMeter(1920, 1e9);
const latencies = spec.events.map(([kind, total, at]) => kind === "sent" ? (m.sent(total, at), null) : m.received(total, at));
const played = Buffer.from(new Float32Array(out).buffer).toString("base64");
console.log(JSON.stringify({ played, targets, dropped: b.dropped, underruns: b.underruns,
  started: b.takeStarted(), latencies, recent: m.recent.map(([, ms]) => ms) }));
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    exe = shutil.which("node") or shutil.which("nodejs")
    if exe is None:
        pytest.skip("node not found (apt-get install nodejs): the web UI's JS is tested in the browser only")
    folder = tmp_path_factory.mktemp("js")
    for name in ("jitter", "latency"):  # .mjs: node reads them as the ES modules they are
        shutil.copy(WEB / f"{name}.js", folder / f"{name}.mjs")
    (folder / "run.mjs").write_text(NODE_RUNNER)

    def call(spec: dict) -> dict:
        (folder / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([exe, str(folder / "run.mjs"), str(folder / "spec.json")], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return call


def test_the_web_ui_jitter_buffer_and_latency_meter_agree_with_python(node):
    rng = np.random.default_rng(0)
    # 15 s of frames with up to 60 ms of jitter, in order (TCP), stalls of 300 and 150 ms,
    # sound card blocks of 128 (the worklet's) and sometimes 480 samples: every rule fires.
    late = rng.integers(0, 60 * MS, 190)
    late[60], late[150] = 300 * MS, 150 * MS
    times = np.maximum.accumulate(np.arange(190) * F + late)
    arrivals = [(int(t), rng.uniform(-1, 1, F).astype(np.float32)) for t in times]
    py = JitterBuffer(0.02, 0.32)
    ops, played, targets, i = [], [], [], 0
    while py.clock < 15 * 24000:
        while i < len(arrivals) and arrivals[i][0] <= py.clock:
            py.push(arrivals[i][1], tag=i)
            ops.append(["push", base64.b64encode(arrivals[i][1].tobytes()).decode(), i])
            i += 1
        n = 480 if rng.random() < 0.2 else 128
        played.append(py.pull(n))
        targets.append(py.target)
        ops.append(["pull", n])
    # Latency events: 20 ms packets sent on time, 80 ms replies with a varying delay; some replies
    # come before the input they need was sent (a stub faster than causality), counted negative.
    events, meter, expected = [], LatencyMeter(), []
    for k in range(40):
        events.append(["sent", (k + 1) * 480, k * 20.0])
    for k in range(8):
        events.append(["received", (k + 1) * F, 100.0 + k * 80 + float(rng.uniform(0, 80))])
    events.sort(key=lambda e: e[2])
    for kind, total, at in events:
        got = getattr(meter, kind)(total, at / 1000)
        expected.append(None if got is None else got * 1000)

    js = node({"least": 0.02, "most": 0.32, "ops": ops, "events": events})
    js_played = np.frombuffer(base64.b64decode(js["played"]), np.float32)
    assert py.underruns > 1 and py.dropped > 0 and max(targets) > py.least  # the scenario did exercise it
    np.testing.assert_allclose(js_played, np.concatenate(played), atol=1e-6)
    assert js["targets"] == targets and js["dropped"] == py.dropped and js["underruns"] == py.underruns
    assert js["started"] == [list(x) for x in py.take_started()]
    want = [x for x, (kind, _, _) in zip(expected, events) if kind == "received"]
    got = [x for x, e in zip(js["latencies"], events) if e[0] == "received"]
    assert [x is None for x in got] == [x is None for x in want]
    assert np.allclose([x for x in got if x is not None], [x for x in want if x is not None])
    assert np.allclose(sorted(js["recent"]), sorted(meter.latencies() * 1000))
