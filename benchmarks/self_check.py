"""The start-up self-check of the fast paths (openmoshi/accel/self_check.py) on random weights:
the fused kernels' relative error and the graphed step's token agreement against the reference,
and how long the check takes (it runs before a server listens). On a GPU this is the real check;
on CPU there are no fused kernels or graphs, so it checks the reference against itself.

    python benchmarks/self_check.py --config moshi_7b --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from openmoshi.accel import fused
from openmoshi.accel.self_check import check_fast_paths
from openmoshi.bench import random_lm
from openmoshi.lm.config import BUILTIN_CONFIGS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=sorted(BUILTIN_CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = random_lm(BUILTIN_CONFIGS[args.config], device, dtype).eval()
    use_fused = fused.wanted(device)
    if use_fused:
        fused.apply(lm)
    start = time.perf_counter()
    result = check_fast_paths(lm, use_fused, device.type == "cuda")
    seconds = time.perf_counter() - start
    row = {"config": args.config, "device": str(device), "fused_checked": use_fused, "ok": result.ok,
           "fused_error": result.fused_error, "graph_agreement": result.graph_agreement,
           "problems": list(result.problems), "seconds": round(seconds, 2)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
