"""Server counters and the step-time histogram, rendered in the Prometheus text format.

Written from the worker thread and the event loop; every update takes one lock (cheap: a few
updates per 80 ms frame), so `/metrics` always sees a consistent snapshot.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Step-time buckets in seconds; 0.08 is the real-time budget of one 80 ms frame.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.active = 0
        self.max_sessions = 0
        self.waiting = 0
        self.batch_rows = 0
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._step_counts = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0.0
        self._step_total = 0

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[name, tuple(sorted(labels.items()))] += amount

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def set_active(self, n: int) -> None:
        with self._lock:
            self.active = n

    def set_waiting(self, n: int) -> None:
        with self._lock:
            self.waiting = n

    def observe_batch(self, rows: int) -> None:
        """The slots the last tick computed: the occupied ones rounded up to a bucket."""
        with self._lock:
            self.batch_rows = rows

    def observe_step(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(STEP_BUCKETS) if seconds <= b), len(STEP_BUCKETS))
            self._step_counts[i] += 1
            self._step_sum += seconds
            self._step_total += 1

    def mean_step_seconds(self) -> float:
        with self._lock:
            return self._step_sum / self._step_total if self._step_total else 0.0

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP openmoshi_conversations_active Conversations holding a model slot.",
                "# TYPE openmoshi_conversations_active gauge",
                f"openmoshi_conversations_active {self.active}",
                "# HELP openmoshi_conversations_max Model slots (--max-sessions).",
                "# TYPE openmoshi_conversations_max gauge",
                f"openmoshi_conversations_max {self.max_sessions}",
                "# HELP openmoshi_queue_waiting Clients waiting for a free slot (--queue).",
                "# TYPE openmoshi_queue_waiting gauge",
                f"openmoshi_queue_waiting {self.waiting}",
                "# HELP openmoshi_batch_rows Slots the last frame computed (occupied, rounded up to a bucket).",
                "# TYPE openmoshi_batch_rows gauge",
                f"openmoshi_batch_rows {self.batch_rows}",
                "# HELP openmoshi_step_seconds Time of one batched 80 ms frame (encode, LM, decode).",
                "# TYPE openmoshi_step_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip(STEP_BUCKETS, self._step_counts):
                cumulative += count
                lines.append(f'openmoshi_step_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines.append(f'openmoshi_step_seconds_bucket{{le="+Inf"}} {self._step_total}')
            lines.append(f"openmoshi_step_seconds_sum {self._step_sum:.6f}")
            lines.append(f"openmoshi_step_seconds_count {self._step_total}")
            seen = set()
            for (name, labels), value in sorted(self._counters.items()):
                if name not in seen:
                    seen.add(name)
                    lines.append(f"# TYPE {name} counter")
                label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
            return "\n".join(lines) + "\n"
