"""Torch's CPU work in a server belongs to one thread: the model loop's.

Torch's CPU build runs its parallel ops on OpenMP (GNU libgomp), and libgomp keeps a pool of
helper threads per thread that ever started a parallel region. Once two threads of a process have
such a pool, libgomp counts more threads than cores and throttles its barrier spinning: each
parallel op then waits on the kernel to wake its helpers, and two torch threads give no more speed
than one. Measured on a 2-core Xeon, Mimi's streaming frame (encode + decode, batch 1): 45 ms when
one thread did all the work, 60-90 ms when the main thread loaded the model and the model loop's
thread then ran it; the server's ticks took 200 ms where `openmoshi bench` took 50, and the
conversation fell seconds behind real time.

A pool is freed when its thread exits. So a server loads its model in a thread that then ends
(`passing`), and the model loop's worker is left as the one thread with a pool:

    model, speed = passing(start, files, device, dtype, quantize, speed_config)
"""

from __future__ import annotations

import threading
from typing import Any, Callable


def passing(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a thread of its own that exits when it returns (its OpenMP pool with
    it); its result, or its exception, here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread, traceback and all
            out["error"] = e

    thread = threading.Thread(target=run, name="openmoshi-startup", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
