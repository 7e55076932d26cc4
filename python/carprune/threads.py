"""How many CPU threads a run should use: the cores not busy with other processes.

On a shared node, intra-op threads beyond the free cores wait on each other at every parallel
region, and many short calls (the engine's tails) suffer most: with one busy process beside it
on 2 cores, 2 threads scored about 2x slower than 1 (benchmarks/bench_load.py). `auto_threads`
samples the kernel's per-CPU counters of the CPUs this process may run on and returns the
number that were idle. `ThreadGovernor` keeps re-checking during a long run (its step
boundaries), counting this process's own CPU time as free, so that a neighbour arriving or
leaving mid-run changes the thread count too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

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


class FreeCores:
    """Idle CPU capacity of the usable CPUs, in cores, over the interval since the previous
    call, with this process's own CPU time counted as idle: what other processes leave free,
    readable while this process computes (`free_cores` instead pauses and samples).

    Read from /proc/stat (busy = every field but idle and iowait, steal included) and
    `time.process_time()` (all threads of this process; its child processes count as others).
    """

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[dict[int, tuple[int, int]], float, float] | None:
        try:
            return _cpu_times(), time.process_time(), time.monotonic()
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> float | None:
        """Free cores since the previous call (None: the counters cannot be read, or no time
        has passed)."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[2] <= last[2]:
            return None
        (a, own0, t0), (b, own1, t1) = last, now
        busy = sum((b[c][1] - a[c][1]) - (b[c][0] - a[c][0])
                   for c in self.cpus if c in a and c in b) / self._hz
        others = max(0.0, busy - (own1 - own0)) / (t1 - t0)
        return max(0.0, len(self.cpus) - others)


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the usable cores that other processes leave
    free (`FreeCores`, rounded, at least 1), re-checked by `update()` at most every `every`
    seconds. The run layer calls `update()` at an algorithm's step boundaries
    (`logging_utils.RunCallbacks`), never inside a step.

    Measured (ResNet-20, the exact search of part (d)'s round 141, 1,000 images, 2-core
    machine): with one other busy process, 2 threads took 113-124 s and 1 thread 26 s; idle,
    2 threads take 14-15 s. A thread count chosen when a run starts is therefore wrong for the
    rest of the run once a neighbour arrives (4.4x slower) or leaves (1 thread on 2 idle
    cores)."""

    def __init__(self, every: float = 10.0, monitor: FreeCores | None = None) -> None:
        if not every >= 0:
            raise ValueError(f"every must be a number of seconds >= 0, got {every!r}")
        self.every = float(every)
        self.monitor = monitor if monitor is not None else FreeCores()
        self._checked = time.monotonic()

    def update(self) -> tuple[int, int, float] | None:
        """(old, new threads, free cores measured) when it changed the thread count, else
        None."""
        now = time.monotonic()
        if now - self._checked < self.every:
            return None
        self._checked = now
        free = self.monitor()
        if free is None:
            return None
        want = max(1, min(len(self.monitor.cpus), int(free + 0.5)))
        old = torch.get_num_threads()
        if want == old:
            return None
        torch.set_num_threads(want)
        return old, want, free
