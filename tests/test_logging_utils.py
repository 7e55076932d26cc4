"""The run layer's progress and stop decisions: `RunCallbacks` (bars, log lines with a
heartbeat, preemption flags), and the one place that asks whether stderr is a terminal."""

from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path

import pytest

from carprune import logging_utils, preempt
from carprune.callbacks import Callbacks, Event
from carprune.distributed import Context
from carprune.logging_utils import RunCallbacks, log

PKG = Path(__file__).resolve().parents[1] / "python" / "carprune"


@pytest.fixture()
def lines():
    """Every record of the carprune logger, at debug level, as text."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield lambda: buf.getvalue().splitlines()
    log.removeHandler(handler)
    log.setLevel(old)


@pytest.fixture(autouse=True)
def _clear_flags():
    preempt.clear()
    yield
    preempt.clear()


def _events(n=3):
    head = {"label": "compress conv2", "unit": "filter", "total": n}
    yield Event("greedy", 0, "compress conv2: start", data={**head, "done": 0})
    for i in range(1, n + 1):
        yield Event("greedy", i, f"conv2: removed filter {i}; {50 - i} of 50 left",
                    data={**head, "done": i})
    yield Event("greedy", n, "compress conv2: kept 47 of 50 filters",
                data={**head, "done": n, "finished": True})


def test_log_mode_one_line_per_step_and_a_heartbeat_between(lines):
    cb = RunCallbacks("log", interval=0.05)
    assert isinstance(cb, Callbacks)
    events = list(_events())
    with cb:
        cb.on_event(events[0])
        time.sleep(0.3)   # a long first step: the heartbeat says the run is alive
        for e in events[1:]:
            cb.on_event(e)
        assert cb._thread is None   # the finishing event ended the heartbeat
    got = lines()
    assert got[0] == "DEBUG compress conv2: start"
    beats = [ln for ln in got if "still running" in ln]
    assert len(beats) >= 2 and all(re.fullmatch(r"INFO compress conv2: still running \(\d+s "
                                                r"elapsed\)", ln) for ln in beats)
    steps = [ln for ln in got if "removed filter" in ln]
    assert [re.sub(r" \(\d+s\)$", "", ln) for ln in steps] == [
        f"INFO conv2: removed filter {i}; {50 - i} of 50 left" for i in (1, 2, 3)]
    assert got[-1] == "DEBUG compress conv2: kept 47 of 50 filters"


def test_the_heartbeat_waits_for_a_quiet_interval_after_each_event(lines):
    # events every 0.1 s for 0.7 s, interval 0.4 s: no "still running" line while they keep
    # coming (a clock that ignored them would have written one); then a quiet second: lines
    # 0.4 s apart
    with RunCallbacks("log", interval=0.4) as cb:
        events = list(_events(8))
        cb.on_event(events[0])
        for e in events[1:-1]:
            time.sleep(0.1)
            cb.on_event(e)
        assert not [ln for ln in lines() if "still running" in ln]
        time.sleep(1.0)
    beats = [ln for ln in lines() if "still running" in ln]
    assert 2 <= len(beats) <= 3, beats


def test_bar_mode_draws_one_bar_and_closes_it(capsys, lines):
    with RunCallbacks("bar") as cb:
        for e in _events():
            cb.on_event(e)
        assert not cb._bar.showing
    err = capsys.readouterr().err
    assert "compress conv2" in err and "3/3" in err and "\r" in err
    assert not [ln for ln in lines() if "removed filter" in ln]   # bars, not log lines


def test_none_mode_and_other_ranks_show_nothing(capsys, lines):
    for cb in (RunCallbacks("none", interval=0.01), RunCallbacks("bar", ctx=Context(rank=1, world_size=2)),
               RunCallbacks("log", interval=0.01, ctx=Context(rank=1, world_size=2))):
        with cb:
            for e in _events():
                cb.on_event(e)
                time.sleep(0.02)
    assert capsys.readouterr().err == "" and lines() == []


def test_should_stop_follows_the_preemption_flag_only_when_preemptible():
    plain, run = RunCallbacks(), RunCallbacks(preemptible=True)
    single = RunCallbacks(preemptible=True, ctx=Context())   # one process: no collective
    assert not plain.should_stop() and not run.should_stop() and not single.should_stop()
    preempt.request_stop("SIGTERM")
    assert not plain.should_stop()          # a library call is never stopped by a flag
    assert run.should_stop() and single.should_stop()
    with pytest.raises(ValueError, match="mode must be 'bar', 'log' or 'none', got 'auto'"):
        RunCallbacks("auto")


def test_the_terminal_question_is_asked_in_one_place(monkeypatch):
    """`callbacks.stderr_is_terminal` asks (the run layer never does itself); the run layer's
    modes and the library's own bars (progress=None) both follow it."""
    from carprune import callbacks

    monkeypatch.setattr(callbacks, "stderr_is_terminal", lambda: True)
    assert logging_utils.stderr_is_terminal()
    assert logging_utils.resolve_mode("auto") == "bar" and logging_utils.progress_mode(None) == "bar"
    assert logging_utils.resolve_mode("auto", rank=1) == "log"
    assert callbacks.progress_callbacks(None, "x").enabled
    monkeypatch.setattr(callbacks, "stderr_is_terminal", lambda: False)
    assert logging_utils.resolve_mode("auto") == "log" and logging_utils.progress_mode(None) == "none"
    assert logging_utils.progress_mode(True) == "bar" and logging_utils.resolve_mode("bar") == "bar"
    assert not callbacks.progress_callbacks(None, "x").enabled
    assert callbacks.progress_callbacks(True, "x").enabled
    assert (PKG / "callbacks.py").read_text().count(".isatty()") == 1
    run_layer = [PKG / "cli.py", PKG / "logging_utils.py", PKG / "distributed.py",
                 PKG / "preempt.py", PKG / "config.py", *sorted((PKG / "commands").glob("*.py"))]
    assert [p.name for p in run_layer if "isatty" in p.read_text()] == []
    # (the library's modules: tests/test_layering.py, which allows callbacks.py alone)
