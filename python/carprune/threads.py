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
    counters cannot be read, e.g. not Linux). This process sleeps meanwhile."""
    monitor = FreeCores(own_is_free=False)
    time.sleep(sample_seconds)
    return monitor()


def threads_for(free: float, cpus: int) -> int:
    """`free` cores as a thread count: rounded, at least 1, at most `cpus`."""
    return max(1, min(cpus, int(free + 0.5)))


def auto_threads(sample_seconds: float = 0.25) -> int:
    """The number of usable CPUs that are idle now (at least 1); all usable CPUs where that
    cannot be measured."""
    cpus = usable_cpus()
    free = free_cores(sample_seconds)
    if free is None:
        return len(cpus)
    return threads_for(free, len(cpus))


def is_auto(value: object) -> bool:
    """Whether a --threads setting is 'auto' (any case, surrounding spaces ignored)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def resolve_threads(value: int | str | None) -> int | None:
    """A --threads setting as a thread count: an integer >= 1, 'auto' (`auto_threads`), or
    None (leave torch's choice)."""
    if value is None:
        return None
    if is_auto(value):
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
    reading, with this process's own CPU time counted as idle (`own_is_free`): what other
    processes leave free, readable while this process computes.

    Read from /proc/stat (busy: every field but idle and iowait, steal included; a CPU's share
    of the interval is its own jiffies) and `time.process_time()` (all threads of this process;
    its child processes count as others). A failed read keeps the previous reading.
    """

    def __init__(self, own_is_free: bool = True) -> None:
        self.cpus = usable_cpus()
        self.own_is_free = own_is_free
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[dict[int, tuple[int, int]], float] | None:
        try:
            return _cpu_times(), time.process_time()
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> float | None:
        """Free cores since the previous reading (None: the counters cannot be read, or no
        time has passed)."""
        now = self._read()
        if now is None:
            return None
        last, self._last = self._last, now
        if last is None:
            return None
        (a, own0), (b, own1) = last, now
        seen = [c for c in self.cpus if c in a and c in b]
        ticks = sum(b[c][1] - a[c][1] for c in seen)     # the CPUs' time, in jiffies
        if ticks <= 0:
            return None
        busy = sum((b[c][1] - a[c][1]) - (b[c][0] - a[c][0]) for c in seen)
        if self.own_is_free:
            busy = max(0.0, busy - (own1 - own0) * self._hz)
        return len(seen) * (1.0 - busy / ticks)


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the usable cores that other processes leave
    free (`FreeCores` since the previous check, `threads_for`), re-checked by `update()` at
    most every `every` seconds. The run layer calls `update()` between torch calls, at an
    algorithm's events (`logging_utils.RunCallbacks`). It changes the count only when the free
    cores differ from it by at least `margin` (so a neighbour busy about half the time does
    not flip it every check), and leaves it alone while code has set another count itself
    (e.g. a one-thread training loop), until that code restores it. What it gains when a
    neighbour arrives or leaves mid-run: `python -m benchmarks.bench_load --midrun S [--leave]`
    (README, "Under load")."""

    def __init__(self, every: float = 10.0, margin: float = 0.6,
                 monitor: FreeCores | None = None) -> None:
        if not every >= 0:
            raise ValueError(f"every must be a number of seconds >= 0, got {every!r}")
        if not 0.5 <= margin < 1:
            raise ValueError(f"margin must lie in [0.5, 1) cores, got {margin!r}")
        self.every, self.margin = float(every), float(margin)
        self.monitor = monitor if monitor is not None else FreeCores()
        self._checked = time.monotonic()
        self._count = torch.get_num_threads()   # the count this governor last saw or set

    def update(self) -> tuple[int, int, float] | None:
        """(old, new threads, free cores measured) when it changed the thread count, else
        None."""
        now = time.monotonic()
        if now - self._checked < self.every:
            return None
        self._checked = now
        free = self.monitor()
        old = torch.get_num_threads()
        if free is None or old != self._count:
            return None
        want = threads_for(free, len(self.monitor.cpus))
        if want == old or abs(free - old) < self.margin:
            return None
        torch.set_num_threads(want)
        self._count = want
        return old, want, free
