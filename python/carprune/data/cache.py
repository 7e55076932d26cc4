"""Where decoded datasets and trained models are cached: outside the repository, per user.

The directory is ``$CARPRUNE_CACHE`` when set, else ``$XDG_CACHE_HOME/carprune``, else
``~/.cache/carprune`` (scripts/env.sh keeps its virtual environments there too). The first decoded
data set a process writes into it is logged once, with the directory and how to move it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..callbacks import log
from ..io import atomic_open

CACHE_VARIABLE = "CARPRUNE_CACHE"
_announced: set[Path] = set()


def cache_dir() -> Path:
    """``$CARPRUNE_CACHE``, else ``$XDG_CACHE_HOME/carprune``, else ``~/.cache/carprune`` (created;
    an empty variable counts as unset)."""
    root = os.environ.get(CACHE_VARIABLE)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(root) if root else Path(xdg) / "carprune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_key(path: Path, *extra: str) -> str:
    """A key that changes when the source file changes (absolute path, size, mtime)."""
    st = path.stat()
    text = "|".join([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), *extra])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def announce_write(path: Path) -> None:
    """Log, once per cache directory and process, that `path` is being cached there."""
    where = path.parent.resolve()
    if where in _announced:
        return
    _announced.add(where)
    log.info("caching %s in %s (decoded once, reused later; set %s to use another directory)",
             path.name, where, CACHE_VARIABLE)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz through a temporary file and a rename: never a half-written cache."""
    announce_write(path)
    with atomic_open(path) as f:
        np.savez(f, **arrays)
