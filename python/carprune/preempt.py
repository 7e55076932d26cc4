"""Cooperative preemption: a signal handler only sets a flag; the run layer reads it where an
algorithm asks whether to stop (`logging_utils.RunCallbacks.should_stop`, after each complete
checkpoint; agreed across ranks by `distributed.sync_stop`), the algorithm raises
`callbacks.Stopped`, and the command exits with `EXIT_PREEMPTED`, so a batch job killed by its
scheduler (SIGTERM) or a user (SIGINT) can be resumed with the same command. `check` and
`Preempted` are the older form of the same stop, for loops that read the flag themselves."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; batch scripts requeue on it

_stop = threading.Event()
_signal_name: list[str] = []


class Preempted(RuntimeError):
    """A run stopped at a step boundary on request; its checkpoint is complete."""


def request_stop(reason: str = "requested") -> None:
    _signal_name[:] = [reason]
    _stop.set()


def clear() -> None:
    _stop.clear()
    _signal_name.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def reason() -> str:
    return _signal_name[0] if _signal_name else ""


def check(where: str) -> None:
    """Raise `Preempted` if a stop was requested (call where a checkpoint is complete)."""
    if _stop.is_set():
        raise Preempted(f"stopped by {reason() or 'request'} after {where}; the checkpoint is "
                        "complete, run the same command again to resume")


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """SIGTERM/SIGINT request a stop at the next step boundary; a second SIGINT interrupts."""

    def handler(signum, frame):
        if signum == signal.SIGINT and _stop.is_set():
            raise KeyboardInterrupt
        request_stop(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, handler)
