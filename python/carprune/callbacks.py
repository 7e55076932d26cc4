"""What a long-running algorithm tells its caller, and how the caller tells it to stop.

The compression algorithms (greedy, global, fine-tuning, Deep Compression, interpretation) are
library code: they never print, read a process-wide flag or look at the terminal. They take a
`Callbacks` object and call

* ``on_event(event)`` at each step boundary (an `Event`: which algorithm, which step, a
  one-line message and the step's figures), and
* ``should_stop()`` only where their checkpoint is complete; when it returns True the algorithm
  raises `Stopped` (the checkpoint on disk then resumes the run exactly).

The run layer (command line, batch jobs, distributed runs) implements both: progress bars or log
lines, signal handling, agreement between ranks. `NO_CALLBACKS` does nothing and never stops.

The library's own voice is here too, in one place: `log`, the "carprune" logger every module
writes to (the run layer attaches its handlers, `logging_utils.setup_logging`), and, for a library
call made with ``progress=True`` (a notebook user), `progress_callbacks`: a tqdm bar or nothing.
Whether stderr is a terminal (``progress=None``) is asked in exactly one function of the package,
`stderr_is_terminal`; the run layer's modes come from it as well.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

LOGGER_NAME = "carprune"

log = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class Event:
    """One step of a long computation.

    `algorithm`: e.g. "greedy", "global", "finetune", "deep-compress", "interpret";
    `step` counts from 1 (0: the run started); `total` is the planned number of steps when
    known; `message` is one human-readable line; `data` holds the step's figures (JSON types).
    """

    algorithm: str
    step: int
    message: str
    total: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Stopped(RuntimeError):
    """The algorithm stopped at a step boundary because `should_stop()` said so; its checkpoint
    is complete and running the same call again resumes it."""


@runtime_checkable
class Callbacks(Protocol):
    def on_event(self, event: Event) -> None:
        """Called at every step boundary."""

    def should_stop(self) -> bool:
        """Asked where stopping is safe (the checkpoint is complete)."""


class _NoCallbacks:
    def on_event(self, event: Event) -> None:
        pass

    def should_stop(self) -> bool:
        return False


NO_CALLBACKS: Callbacks = _NoCallbacks()


def stop_point(callbacks: Callbacks | None, where: str) -> None:
    """Raise `Stopped` if `callbacks` asks to stop; call it only where a checkpoint is complete."""
    if callbacks is not None and callbacks.should_stop():
        raise Stopped(f"stopped after {where}; the checkpoint is complete, run the same command "
                      "again to resume")


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars) rather than a file or pipe: the one place the
    package asks (the run layer's `logging_utils.stderr_is_terminal` calls this)."""
    return sys.stderr.isatty()


def show_progress(progress: bool | None) -> bool:
    """A library function's `progress` argument as a decision: True and False as given, None
    when stderr is a terminal."""
    return stderr_is_terminal() if progress is None else bool(progress)


class ProgressBar:
    """`Callbacks` drawing a computation as one tqdm bar (when `enabled`; else it does nothing
    and never imports tqdm). Never asks to stop.

    Fed events (`on_event`), it shows ``data["done"]`` of ``data["total"]`` ``data["unit"]``s
    (else the event's step of its total) under ``data["label"]`` (else `what`), with
    ``data["postfix"]`` beside it; an event with another label starts a new bar, one with
    ``data["finished"]`` closes it. A loop that counts rather than sends events gives `total`
    (the bar then opens at once, at 0) and calls ``update(n)``. Use it as a context manager (or
    call `close()`)."""

    def __init__(self, what: str, *, total: int | None = None, unit: str = "step",
                 leave: bool = True, enabled: bool = True) -> None:
        self.what, self.total, self.unit, self.leave = what, total, unit, leave
        self.enabled = bool(enabled)
        self._bar: Any = None
        if self.enabled and total is not None:
            self._open(what, total, 0, unit)

    def _open(self, label: str, total: int | None, done: int, unit: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=done, desc=label, unit=unit, leave=self.leave)

    def on_event(self, event: Event) -> None:
        if not self.enabled:
            return
        data = event.data
        label = str(data.get("label", self.what))
        total = data.get("total", event.total)
        done = int(data.get("done", event.step))
        if self._bar is not None and self._bar.desc != label:
            self.close()
        if self._bar is None:
            self._open(label, total, done, str(data.get("unit", self.unit)))
        else:
            self._bar.total = total
            self._bar.n = done
        if data.get("postfix"):
            self._bar.set_postfix_str(str(data["postfix"]), refresh=False)
        self._bar.refresh()
        if data.get("finished"):
            self.close()

    def should_stop(self) -> bool:
        return False

    @property
    def showing(self) -> bool:
        """Whether a bar is open now."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Advance the bar by `n` (opening it, with `total`, on the first call)."""
        if not self.enabled:
            return
        if self._bar is None:
            self._open(self.what, self.total, 0, self.unit)
        self._bar.update(n)

    def close(self) -> None:
        """End the bar (a later event or update opens a new one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_callbacks(progress: bool | None, what: str, *, total: int | None = None,
                       unit: str = "step", leave: bool = True) -> ProgressBar:
    """The progress a library call shows by itself: a tqdm bar described by `what` when
    `show_progress(progress)` (True; None: on a terminal), else a `ProgressBar` that does
    nothing. `total` and `unit` describe what `update` counts; `leave`: keep the finished bar."""
    return ProgressBar(what, total=total, unit=unit, leave=leave, enabled=show_progress(progress))


__all__ = ["LOGGER_NAME", "NO_CALLBACKS", "Callbacks", "Event", "ProgressBar", "Stopped", "log",
           "progress_callbacks", "show_progress", "stderr_is_terminal", "stop_point"]
