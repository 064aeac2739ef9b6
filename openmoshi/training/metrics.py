"""What a run tells: `RUN_DIR/metrics.jsonl` (one JSON line per step, and one per evaluation),
a progress bar on the terminal, and TensorBoard events when TensorBoard is installed.

    {"step": 12, "loss": 3.1, "text_loss": 1.2, "audio_loss": 1.9, "lr": 2e-06, "grad_norm": 0.8,
     "tokens_per_s": 5400.0, "peak_mem_gb": 21.3}
    {"step": 100, "eval": true, "loss": 2.9, "text_loss": 1.1, "audio_loss": 1.8}

tokens_per_s counts every code of the batch (segments x streams x frames), as moshi-finetune does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def peak_memory_gb(device) -> float:
    """Peak memory of this process: CUDA's allocator peak, or on a CPU the peak resident set of this
    process image (VmHWM; ru_maxrss would carry a parent's peak over fork + exec)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, first_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.board = None
        if not enabled:
            return
        self._truncate_after(first_step)  # a resumed run continues the history it resumes from
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.board = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = "eval/" if record.get("eval") else "train/"
        if self.board is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.board.add_scalar(prefix + k, v, record["step"])
        if self.bar is not None:
            if record.get("eval"):
                self.note(f"step {record['step']}: eval loss {record['loss']:.4f} "
                          f"(text {record['text_loss']:.4f}, audio {record['audio_loss']:.4f})")
            else:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                self.bar.update(1)

    def note(self, message: str) -> None:
        """A line on the terminal that leaves the progress bar in place."""
        if self.bar is not None:
            self.bar.write(f"openmoshi: {message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
