import os
import sys
from pathlib import Path

# The official package compiles its kernels lazily with torch.compile, which costs minutes on a
# small CPU and changes nothing in the results: run it eagerly.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, Triton kernels (openmoshi.accel.fused, openmoshi.accel.int8_kernel) run on CPU tensors through
# Triton's interpreter, so CI checks them against the reference code. Read when a kernel is defined,
# i.e. when those modules are first imported, hence here.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
