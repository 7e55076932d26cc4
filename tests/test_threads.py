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
    assert threads.is_auto(" Auto ") and not threads.is_auto(2) and not threads.is_auto("2")
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


def test_free_cores_monitor_counts_own_cpu_time_as_free(monkeypatch):
    # over 1 s of wall time: cpu0 and cpu1 each busy for 1 s (100 jiffies at 100 Hz), of which
    # 1.2 s was this process's own CPU time: other processes held 0.8 cores
    a = {0: (0, 1000), 1: (0, 1000)}
    b = {0: (0, 1100), 1: (0, 1100)}
    snaps = iter([a, b])
    own = iter([5.0, 6.2])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(snaps))
    monkeypatch.setattr(threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(threads.time, "process_time", lambda: next(own))
    mon = threads.FreeCores()
    assert mon() == pytest.approx(2 - 0.8)


class _Monitor:
    def __init__(self, values, cpus=2):
        self.values, self.cpus = iter(values), list(range(cpus))

    def __call__(self):
        return next(self.values)


def test_thread_governor_follows_free_cores():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = threads.ThreadGovernor(every=0, monitor=_Monitor(
            [0.7, 1.1, 1.6, None, 5.0, 1.45, 0.2, 0.2]))
        assert gov.update() == (2, 1, 0.7) and torch.get_num_threads() == 1
        assert gov.update() is None and torch.get_num_threads() == 1     # 1.1 -> 1: no change
        assert gov.update() == (1, 2, 1.6) and torch.get_num_threads() == 2
        assert gov.update() is None                                      # unreadable counters
        assert gov.update() is None and torch.get_num_threads() == 2     # capped at the CPUs
        assert gov.update() is None and torch.get_num_threads() == 2     # 1.45: within margin
        torch.set_num_threads(3)                 # code that sets its own count: left alone
        assert gov.update() is None and torch.get_num_threads() == 3
        torch.set_num_threads(2)                 # ... until it restores the count
        assert gov.update() == (2, 1, 0.2) and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match=r"margin must lie in \[0.5, 1\) cores, got 2"):
            threads.ThreadGovernor(margin=2)
        slow = threads.ThreadGovernor(every=3600, monitor=_Monitor([0.1]))
        assert slow.update() is None and torch.get_num_threads() == 1    # not due yet
        with pytest.raises(ValueError, match="every must be a number of seconds >= 0"):
            threads.ThreadGovernor(every=-1)
    finally:
        torch.set_num_threads(before)


def test_free_cores_monitor_on_real_processes():
    cpus = threads.usable_cpus()
    if len(cpus) < 2:
        pytest.skip(f"needs 2 usable CPUs, this process has {len(cpus)}")
    if not threads._STAT.exists():
        pytest.skip("no /proc/stat on this system")
    spin = "import time\nt = time.time() + 20\nwhile time.time() < t:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        mon = threads.FreeCores()
        t = time.monotonic() + 0.8
        while time.monotonic() < t:   # this process busy too: its own time counts as free
            pass
        assert mon() <= len(cpus) - 0.5   # the other process holds a core
    finally:
        proc.kill()
        proc.wait()


def test_governor_only_for_auto_in_one_process():
    from types import SimpleNamespace

    from carprune.commands import _common as common

    one, two = SimpleNamespace(world_size=1), SimpleNamespace(world_size=2)
    assert isinstance(common.thread_governor(SimpleNamespace(threads="auto"), one),
                      threads.ThreadGovernor)
    assert common.thread_governor(SimpleNamespace(threads=2), one) is None
    assert common.thread_governor(SimpleNamespace(threads="auto"), two) is None


def test_run_callbacks_log_thread_changes(caplog):
    import torch

    from carprune.callbacks import Event
    from carprune.logging_utils import RunCallbacks

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = threads.ThreadGovernor(every=0, monitor=_Monitor([0.6]))
        with caplog.at_level("INFO", logger="carprune"), RunCallbacks("none", threads=gov) as cb:
            cb.on_event(Event("global", 1, "round 1"))
        assert torch.get_num_threads() == 1
        assert "CPU threads 2 -> 1 (other processes leave 0.6 of 2 cores free)" in caplog.text
    finally:
        torch.set_num_threads(before)
