"""Everything a client controls, fuzzed at length against a real `openmoshi serve` subprocess (tiny
random checkpoint, CPU): the query strings of /api/chat, control and metadata messages on a started
conversation, and /v1/realtime client events with every field of any JSON type and magnitude (the
strategies of tests/edge_fuzz.py, which the tests run bounded). After every case a normal
conversation must be served and /health be 200; the server's model loop must never have had to
isolate anything (failed ticks, failed commands and restarts stay 0: the edge refuses first).

    python benchmarks/fuzz_edge.py --cases 2000 [--seed 0]

Prints one JSON line: cases per kind, outcomes (refused, served, rejected by the HTTP layer),
failures (a case whose probe failed, with the first few examples), the model loop's counters and
the server's memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

from serving_utils import free_port, health, rss_mb, start_server, stop_server, tiny_checkpoint, wait_ready

from edge_fuzz import (chat_messages, probe, query_cases, realtime_events, run_chat_case, run_query_case,
                       run_realtime_case)


def fuzz(kind: str, strategy, play, cases: int, seed: int, port: int, outcomes: Counter, failures: list) -> None:
    url, http = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    target = url + ("/v1/realtime" if kind == "realtime" else "/api/chat")

    @hypothesis_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case):
        try:
            outcomes[kind, asyncio.run(play(target, case))] += 1
            asyncio.run(probe(url + "/api/chat", http))
        except Exception as e:  # recorded, not raised: hypothesis would stop and shrink
            outcomes[kind, "failed"] += 1
            if len(failures) < 5:
                failures.append({"kind": kind, "case": repr(case)[:300], "error": traceback.format_exception_only(e)[-1]})

    one()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000, help="cases of each kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    folder = tiny_checkpoint(Path(tempfile.mkdtemp(prefix="openmoshi-fuzz-edge-")) / "model")
    port = free_port()
    proc = start_server(folder, port, "--max-sessions", "2", "--queue-timeout", "30")
    try:
        asyncio.run(wait_ready(port, proc))
        rss_before = rss_mb(proc.pid)
        outcomes, failures, start = Counter(), [], time.monotonic()
        for kind, strategy, play in (("query", query_cases(), run_query_case), ("chat", chat_messages(), run_chat_case),
                                     ("realtime", realtime_events(), run_realtime_case)):
            fuzz(kind, strategy, play, args.cases, args.seed, port, outcomes, failures)
        body = asyncio.run(health(port))
        print(json.dumps({
            "cases": args.cases * 3, "seconds": round(time.monotonic() - start, 1),
            "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(outcomes.items())},
            "failed": sum(n for (_, o), n in outcomes.items() if o == "failed"), "failures": failures,
            "server_alive": proc.poll() is None, "health": body["status"], "model_loop": body["model_loop"],
            "rss_mb": [round(rss_before, 1), round(rss_mb(proc.pid), 1)]}))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
