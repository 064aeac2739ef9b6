import os
import sys
from pathlib import Path

# The official package compiles its kernels lazily with torch.compile, which costs minutes on a
# small CPU and changes nothing in the results: run it eagerly.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
