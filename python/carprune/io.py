"""Atomic file writes (results are written to a temporary file and renamed, so an interrupted
run never leaves a half-written file under the final name) and safe reading of torch files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _default_mode() -> int:
    """The permissions open() would give a new file (0666 less the umask): mkstemp's 0600 would
    hide results from the rest of a group sharing an HPC project directory."""
    try:  # Linux: read it without the process-wide os.umask(0) round trip
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    with atomic_open(path, mode) as f:
        write(f)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False), mode="w")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc})") from exc


def read_tensor_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """The contents of a file written by ``torch.save``, read with ``weights_only=True`` (tensors,
    containers and plain values only: nothing in the file is executed).

    A file that is not a torch file, or is corrupt, or holds other Python objects raises
    ValueError naming the file; torch's own advice to retry with ``weights_only=False`` (which
    would run code from the file) is never passed on.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        marker = "Unsupported global: GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            raise ValueError(
                f"{what} {path} holds a Python object ({name}) besides tensors; carprune reads only "
                "tensors, never code. Save the weights as a state dict: "
                "torch.save(model.state_dict(), path)") from None
        raise ValueError(f"{what} {path} is not a PyTorch checkpoint, or it is corrupt") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            AttributeError, TypeError) as exc:
        raise ValueError(f"{what} {path} is not a PyTorch checkpoint, or it is corrupt "
                         f"({type(exc).__name__})") from None
