"""How much memory a device has free, for the checks commands make before they allocate.

May import: nothing.
"""

from __future__ import annotations


def available_bytes(device) -> int | None:
    """Free memory of `device`: CUDA's free memory, or on a CPU the kernel's MemAvailable (what
    can be allocated without swapping), bounded by this process's address-space limit (`ulimit -v`)
    when there is one. None when it cannot be known."""
    import torch  # here: the command line imports this module before it needs torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = _address_space_left()
    if limit is not None:
        free = limit if free is None else min(free, limit)
    return free


def _address_space_left() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    except OSError:
        pass
    return soft


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"
