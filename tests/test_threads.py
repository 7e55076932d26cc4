"""carprune.threads: the thread count a run picks is the number of idle usable CPUs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from carprune import threads


def _fake_counters(monkeypatch, snapshots, cpus):
    it = iter(snapshots)
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    monkeypatch.setattr(threads, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)


def test_free_cores_counts_idle_time_of_usable_cpus_only(monkeypatch):
    # cpu0 fully busy, cpu1 idle, cpu2 half idle but not usable by this process
    a = {0: (100, 1000), 1: (500, 1000), 2: (0, 1000)}
    b = {0: (100, 1100), 1: (600, 1100), 2: (50, 1100)}
    _fake_counters(monkeypatch, [a, b], [0, 1])
    assert threads.free_cores() == pytest.approx(1.0)
    _fake_counters(monkeypatch, [a, b], [0, 1])
    assert threads.auto_threads() == 1
    _fake_counters(monkeypatch, [a, b], [1, 2])
    assert threads.free_cores() == pytest.approx(1.5)
    _fake_counters(monkeypatch, [a, b], [0])
    assert threads.auto_threads() == 1  # never fewer than one


def test_resolve_threads():
    assert threads.resolve_threads(None) is None
    assert threads.resolve_threads(3) == 3 and threads.resolve_threads("2") == 2
    assert 1 <= threads.resolve_threads("auto") <= len(threads.usable_cpus())
    for bad in (0, -1, "x"):
        with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
            threads.resolve_threads(bad)


def test_busy_processes_leave_fewer_threads():
    cpus = threads.usable_cpus()
    if len(cpus) < 2:
        pytest.skip(f"needs 2 usable CPUs, this process has {len(cpus)}")
    spin = "import time\nt = time.time() + 20\nwhile time.time() < t:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert threads.auto_threads(0.5) <= len(cpus) - 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
