"""`Dist.agree` across two gloo processes: a failure on one rank is raised on both, the failed rank
keeping its own exception, the other getting a user error as the same kind (one line at the command
line) and a bug as a RuntimeError that names it."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openmoshi.training.distributed import Dist
from openmoshi.training.manifest import DataError


def _rank(rank: int, port: int, kind: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = Dist(rank, 2, rank, torch.device("cpu"))
    mine = (DataError("data.jsonl: line 3 is not JSON") if kind == "user" else KeyError("slot")) if rank == 0 else None
    try:
        d.agree(mine)
        results[rank] = ("nothing raised", "", False)
    except Exception as e:
        results[rank] = (type(e).__name__, str(e), e is mine)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,other", [
    ("user", ("DataError", "data.jsonl: line 3 is not JSON", False)),
    ("bug", ("RuntimeError", "another process failed: KeyError: 'slot'", False)),
])
def test_a_failure_on_one_rank_is_raised_on_both(kind, other):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, kind, results), nprocs=2, join=True)
        failed, told = results[0], results[1]
    assert failed[0] == ("DataError" if kind == "user" else "KeyError") and failed[2]  # its own exception
    assert told == other
