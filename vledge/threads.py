"""The default thread count: the cores other processes do not keep busy.

Torch-free; ``vledge train``, ``vledge eval`` and ``vledge quickstart`` share it.
"""

from __future__ import annotations

import math
import os


def default_threads() -> int:
    """The cores other processes do not keep busy (1-minute load average, read before any work of ours).

    A torch thread that shares its core with a busy process stalls every parallel op it takes part
    in: on a 2-core machine with other work running, 2 threads trained the small preset 5x slower
    than 1 (15.1 vs 3.0 s/step, docs/results.md). Idle, all cores are used.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return cores
    return max(1, min(cores, cores - math.floor(load + 0.5)))
