"""How many CPU threads a run should use: the cores not busy with other processes.

On a shared node, intra-op threads beyond the free cores wait on each other at every parallel
region, and many short calls (the engine's tails) suffer most: with one busy process beside it
on 2 cores, 2 threads scored about 2x slower than 1 (benchmarks/bench_load.py). `auto_threads`
samples the kernel's per-CPU counters of the CPUs this process may run on and returns the
number that were idle.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_STAT = Path("/proc/stat")


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{cpu: (idle jiffies, total jiffies)} from /proc/stat."""
    out = {}
    for line in _STAT.read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            out[int(name[3:])] = (idle, sum(v[:8]))
    return out


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def free_cores(sample_seconds: float = 0.25) -> float | None:
    """Idle CPU capacity among the usable CPUs over `sample_seconds`, in cores (None where the
    counters cannot be read, e.g. not Linux)."""
    cpus = usable_cpus()
    try:
        a = _cpu_times()
        time.sleep(sample_seconds)
        b = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    free = 0.0
    for c in cpus:
        if c in a and c in b:
            total = b[c][1] - a[c][1]
            free += (b[c][0] - a[c][0]) / total if total > 0 else 1.0
    return free


def auto_threads(sample_seconds: float = 0.25) -> int:
    """The number of usable CPUs that are idle now (at least 1); all usable CPUs where that
    cannot be measured."""
    cpus = usable_cpus()
    free = free_cores(sample_seconds)
    if free is None:
        return len(cpus)
    return max(1, min(len(cpus), int(free + 0.5)))


def resolve_threads(value: int | str | None) -> int | None:
    """A --threads setting as a thread count: an integer >= 1, 'auto' (`auto_threads`), or
    None (leave torch's choice)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_threads()
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {value!r}")
    return n
