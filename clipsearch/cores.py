"""How many CPU cores this process may use: what thread pools and worker counts are sized from."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)
