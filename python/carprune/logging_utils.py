"""Progress for people and for batch logs.

On a terminal a run shows tqdm bars. In a batch job stderr is a file, where bars turn into one
long line of carriage returns, so there a run writes plain timestamped log lines instead: one
per greedy step, one per scored layer, and a heartbeat every ``--log-interval`` seconds while a
long computation runs, so a stalled job and a slow one can be told apart from the log alone.
With several ranks only rank 0 reports progress; other ranks log warnings and errors.

`RunCallbacks` is the run layer's side of `carprune.callbacks`: it shows the step events of the
compression algorithms (bars or log lines) and answers their "should I stop now?" from the
preemption flags, agreed across ranks. Whether stderr is a terminal is asked in one place in the
package, `callbacks.stderr_is_terminal` (`stderr_is_terminal` here calls it); `RunCallbacks` draws
its bars with the library's `callbacks.ProgressBar`. `log` is the library's logger (`callbacks.log`),
re-exported: this module gives it its handlers.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from . import callbacks, preempt
from .callbacks import LOGGER_NAME as LOGGER_NAME  # re-exported: the logger's name
from .callbacks import Event, ProgressBar, log
from .threads import ThreadGovernor

MODES = ("auto", "bar", "log", "none")


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars) rather than a file or pipe (log lines), as
    `callbacks.stderr_is_terminal` (the package's one place to ask) says."""
    return callbacks.stderr_is_terminal()


def resolve_mode(mode: str, rank: int = 0) -> str:
    """'bar' on a terminal, 'log' otherwise (for 'auto'); ranks other than 0 show no bars."""
    if mode not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "bar" if stderr_is_terminal() else "log"
    if rank != 0 and mode == "bar":
        mode = "log"
    return mode


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced after
    setup, e.g. by a test harness or an embedding application)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def __init__(self, rank: int | None) -> None:
        tag = f"carprune[{rank}]" if rank is not None else "carprune"
        super().__init__(f"%(asctime)s {tag} %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(mode: str, rank: int = 0, world_size: int = 1, level: str = "info") -> logging.Logger:
    """Log lines go to stderr (stdout stays for results). With several ranks each line names its
    rank, and ranks other than 0 log warnings and errors only, so a log is not N copies."""
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(rank if world_size > 1 else None))
    log.addHandler(handler)
    log.propagate = False
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    if mode == "none" or (rank != 0 and lvl < logging.WARNING):
        lvl = logging.WARNING
    log.setLevel(lvl)
    return log


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


@contextmanager
def heartbeat(activity: str, interval: float, enabled: bool = True) -> Iterator[None]:
    """While the body runs, log '<activity>: still running (elapsed)' every `interval` seconds.

    The engine's inner loops have no hook for log lines; a heartbeat thread at least shows in a
    batch log that the job is alive and how long the current piece has taken."""
    if not enabled or interval <= 0:
        yield
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval):
            log.info("%s: still running (%s elapsed)", activity, format_seconds(time.monotonic() - t0))

    th = threading.Thread(target=beat, name="carprune-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def recheck_threads(governor: ThreadGovernor | None) -> None:
    """`governor.update()` (nothing without one), a change logged at info level: the run
    layer's one way to follow the free cores (`RunCallbacks`, `PhaseProgress`)."""
    if governor is None:
        return
    change = governor.update()
    if change is not None:
        old, n, free = change
        log.info("CPU threads %d -> %d (other processes leave %.1f of %d cores free)",
                 old, n, free, len(governor.monitor.cpus))


class RunCallbacks:
    """The run layer's `carprune.callbacks.Callbacks`: shows an algorithm's step events and
    answers its "should I stop now?".

    Display, by `mode` ('bar', 'log' or 'none', as `resolve_mode` / `progress_mode` give it):

    - 'bar': a tqdm bar per run of an algorithm, described by the event's ``data["label"]``
      (e.g. "compress conv2"), at ``data["done"]`` of ``data["total"]`` ``data["unit"]``s (else
      the event's step of its total), with ``data["postfix"]`` (a short text) beside it; an
      event with ``data["finished"]`` closes it;
    - 'log': one log line per step (the event's message and the step's time: ``data["seconds"]``
      when the event reports it, else the time since the previous event; step 0, the start, and
      the finishing event at debug level) and, every `interval` seconds
      without an event, a "<label>: still running (<elapsed>)" line, so a stalled job and a slow
      one can be told apart from the log alone;
    - 'none': nothing. With `ctx` on a rank other than 0 nothing is shown either.

    `should_stop()` is False unless `preemptible`; then it is whether a stop was requested
    (SIGTERM/SIGINT through `preempt`'s handlers). Under torchrun (`ctx` with several ranks) the
    ranks first agree (`distributed.sync_stop`, a collective): algorithms ask at the same step
    boundary on every rank, so all stop after the same step. `threads`: a
    `threads.ThreadGovernor` updated at every event (`--threads auto`), its changes logged. Use
    it as a context manager (or call `close()`): that ends the bar and the heartbeat thread.
    """

    def __init__(self, mode: str = "none", *, interval: float = 60.0, ctx: Any = None,
                 preemptible: bool = False, threads: ThreadGovernor | None = None) -> None:
        if mode not in ("bar", "log", "none"):
            raise ValueError(f"mode must be 'bar', 'log' or 'none', got {mode!r}")
        self.mode = mode if ctx is None or ctx.is_main else "none"
        self.interval, self.ctx, self.preemptible = interval, ctx, preemptible
        self.threads = threads
        self.last_event: Event | None = None
        self._bar = ProgressBar("", enabled=self.mode == "bar")
        self._label = ""
        self._t = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- Callbacks ---------------------------------------------------------------------------------
    def recheck_threads(self) -> None:
        """`recheck_threads(self.threads)`. Called at every event; a command whose algorithm
        sends none calls it at its own step boundaries."""
        recheck_threads(self.threads)

    def on_event(self, event: Event) -> None:
        self.recheck_threads()
        now = time.monotonic()
        data = event.data
        label = str(data.get("label", event.algorithm))
        with self._lock:
            since, self._t = now - self._t, now
            self._label = label
            self.last_event = event
        finished = bool(data.get("finished"))
        if self.mode == "bar":
            self._bar.on_event(Event(event.algorithm, event.step, event.message, event.total,
                                     {**data, "label": label}))
        elif self.mode == "log":
            if event.step == 0 or finished:
                log.debug("%s", event.message)
            else:
                took = data.get("seconds")
                log.info("%s (%s)", event.message, format_seconds(since)
                         if not isinstance(took, (int, float)) else
                         f"{took:.2f}s" if took < 60 else format_seconds(took))
            if finished:
                self._end_heartbeat()
            elif self._thread is None and self.interval > 0:
                self._stop.clear()
                self._thread = threading.Thread(target=self._beat, name="carprune-heartbeat",
                                                daemon=True)
                self._thread.start()

    def should_stop(self) -> bool:
        if not self.preemptible:
            return False
        if self.ctx is not None:
            from .distributed import sync_stop

            return sync_stop(self.ctx)
        return preempt.stop_requested()

    # -- display -----------------------------------------------------------------------------------
    def _beat(self) -> None:
        """A "still running" line once `interval` seconds pass without an event (or since the
        last such line)."""
        last = float("-inf")
        while True:
            with self._lock:
                t = self._t
            wait = max(t, last) + self.interval - time.monotonic()
            if wait > 0:
                if self._stop.wait(wait):
                    return
                continue
            with self._lock:
                label, since = self._label, time.monotonic() - self._t
            log.info("%s: still running (%s elapsed)", label, format_seconds(since))
            last = time.monotonic()

    def _end_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """End the bar and the heartbeat thread (the callbacks can be used again after)."""
        self._bar.close()
        self._end_heartbeat()

    def __enter__(self) -> RunCallbacks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_mode(progress: bool | None) -> str:
    """A library function's `progress` argument as a mode: True 'bar', False 'none', None 'bar'
    on a terminal and 'none' otherwise (a library call writes no log lines unless asked), as
    `callbacks.show_progress` decides it for the library."""
    return "bar" if callbacks.show_progress(progress) else "none"


def _fmt_info(info: Mapping[str, Any]) -> str:
    parts = []
    for k, v in info.items():
        if k == "accuracy" and isinstance(v, float):
            parts.append(f"accuracy {100 * v:.2f} %")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


class PhaseProgress:
    """A progress callback ``(phase, done, total, info)`` for runs made of phases (such as
    `deepcompress.deep_compress`'s ``on_progress``), shown as the command line shows progress:

    - 'bar': one tqdm bar per phase, with the info (e.g. the loss) beside it;
    - 'log': a log line when a phase starts and when it ends (with its time and info), and every
      `interval` seconds in between the phase, its progress and the elapsed time, from a
      heartbeat thread, so a step that takes minutes still shows where the run is;
    - 'none': nothing.

    `threads`: a `threads.ThreadGovernor` re-checked at every call (`recheck_threads`; it
    measures at most every 10 s), in any mode. Use it as a context manager (the heartbeat
    thread and bars end with the block)."""

    def __init__(self, mode: str, interval: float = 60.0, activity: str = "", *,
                 threads: ThreadGovernor | None = None) -> None:
        if mode not in ("bar", "log", "none"):
            raise ValueError(f"mode must be 'bar', 'log' or 'none', got {mode!r}")
        self.mode, self.interval, self.activity = mode, interval, activity
        self.threads = threads
        self._phase: str | None = None
        self._state: tuple[str, int, int, Mapping[str, Any]] | None = None
        self._t0 = self._tp = time.monotonic()
        self._bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _prefix(self) -> str:
        return f"{self.activity}: " if self.activity else ""

    def __call__(self, phase: str, done: int, total: int, info: Mapping[str, Any] | None = None
                 ) -> None:
        recheck_threads(self.threads)
        info = dict(info or {})
        if self.mode == "none":
            return
        now = time.monotonic()
        if phase != self._phase:
            self._end_phase(now)
            self._phase, self._tp = phase, now
            if self.mode == "bar":
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=phase, leave=False)
            else:
                log.info("%s%s (%d step%s)", self._prefix(), phase, total, "" if total == 1 else "s")
        self._state = (phase, done, total, info)
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            if info:
                self._bar.set_postfix_str(_fmt_info(info), refresh=False)
            self._bar.refresh()

    def _end_phase(self, now: float) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "log" and self._state is not None:
            phase, done, total, info = self._state
            log.info("%s%s %s: %d/%d in %s%s", self._prefix(), phase,
                     "done" if done >= total else "stopped", done, total,
                     format_seconds(now - self._tp), f" ({_fmt_info(info)})" if info else "")
        self._state = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            st = self._state
            if st is None:
                continue
            phase, done, total, info = st
            log.info("%s%s %d/%d (%s in this phase, %s in all)%s", self._prefix(), phase, done,
                     total, format_seconds(time.monotonic() - self._tp),
                     format_seconds(time.monotonic() - self._t0),
                     f", {_fmt_info(info)}" if info else "")

    def __enter__(self) -> PhaseProgress:
        if self.mode == "log" and self.interval > 0:
            self._thread = threading.Thread(target=self._beat, name="carprune-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the last phase (its 'done' line or bar) and the heartbeat thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_phase(time.monotonic())
        self._phase = None
