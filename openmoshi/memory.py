"""How much memory a device has free, for the checks commands make before they allocate.

May import: nothing.
"""

from __future__ import annotations

import torch


def available_bytes(device) -> int | None:
    """Free memory of `device`: CUDA's free memory, or on a CPU the kernel's MemAvailable (what
    can be allocated without swapping). None when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"
