"""Runtime choices shared by every command that computes: how many torch threads to use.

On shared cores, torch threads that wait for each other are several times slower than one thread,
so the default counts the cores other processes keep busy and takes the rest.
"""

from __future__ import annotations

import os
import time

from infscope.errors import InfscopeError


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies summed over all CPUs from ``/proc/stat`` (``None`` off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # guest time (fields 8-9) is already counted in user time
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return total - idle, total


def busy_cores(window: float = 0.3) -> int:
    """Cores other processes keep busy right now: CPU use over ``window`` seconds, else the load average.

    The 1-minute load average lags by a minute: just after another job ends it still reports a busy
    core, and a demo started then would run on half the machine (4 min 31 s instead of 2 min 58 s
    here). A short sample of ``/proc/stat`` sees the cores as they are.
    """
    cores = os.cpu_count() or 1  # /proc/stat sums every CPU of the machine
    before = _cpu_times()
    if before is not None:
        time.sleep(window)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            share = (after[0] - before[0]) / (after[1] - before[1])
            return int(share * cores + 0.5)
    return int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0


def set_threads(threads: int | None) -> None:
    """Choose torch's CPU threads: the given number, or by default the cores other processes leave idle.

    On shared cores, torch threads that wait for each other are several times slower than one
    thread (measured on this 2-core machine: 5.3 s vs 17.9 s per SmolLM2 step), so the default
    counts busy cores (:func:`busy_cores`) instead of always taking every core.
    """
    import torch  # deferred: importing torch costs seconds, and busy_cores does not need it

    if threads is not None and threads < 1:
        raise InfscopeError(f"--threads must be at least 1, got {threads}")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, min(torch.get_num_threads(), cores - busy_cores()))
    torch.set_num_threads(threads)
