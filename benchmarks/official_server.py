"""The official moshi 0.2.13 server (`python -m moshi.server`), runnable on a CPU and in float32, for
benchmarks that measure it beside ours: its own code runs unchanged, with three shims.

    python benchmarks/official_server.py --dtype float32 -- --moshi-weight lm.safetensors \
        --mimi-weight mimi.safetensors --tokenizer tok.model --config-path config.json \
        --device cpu --static none --port 8999

- `torch.cuda.synchronize` (its warm-up calls it unconditionally) does nothing without CUDA;
- `--dtype` overrides the bfloat16/float16 its `--half` flag allows (float32: as our CPU runs);
- on a CPU its lazy torch.compile is off (NO_TORCH_COMPILE=1, as the tests run it): compiling takes
  minutes on a small CPU and is not what its CPU users get either.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="the LM's dtype (default: the official server's own choice, bfloat16)")
    p.add_argument("official_args", nargs=argparse.REMAINDER, help="after --: the official server's flags")
    args = p.parse_args()
    rest = args.official_args[1:] if args.official_args[:1] == ["--"] else args.official_args

    import torch

    device = rest[rest.index("--device") + 1] if "--device" in rest[:-1] else "cuda"  # its default
    if device == "cpu":
        os.environ.setdefault("NO_TORCH_COMPILE", "1")
        os.environ.setdefault("NO_CUDA_GRAPH", "1")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    if args.dtype is not None:
        from moshi.models import loaders

        dtype, get_moshi = getattr(torch, args.dtype), loaders.CheckpointInfo.get_moshi

        def get_moshi_in_dtype(self, *a, **kw):
            kw["dtype"] = dtype
            return get_moshi(self, *a, **kw)

        loaders.CheckpointInfo.get_moshi = get_moshi_in_dtype
    sys.argv = ["moshi.server", *rest]
    runpy.run_module("moshi.server", run_name="__main__")


if __name__ == "__main__":
    main()
