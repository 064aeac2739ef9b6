"""The OPENMOSHI_NO_* environment switches that turn a speed path off at every call site."""

from __future__ import annotations

import os


def env_disabled(name: str) -> bool:
    """Whether the switch `name` is set to anything but "", 0, no, n, false."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "n", "false")
