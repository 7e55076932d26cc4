"""Where decoded datasets and trained models are cached: outside the repository, per user."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..io import atomic_open


def cache_dir() -> Path:
    """``$CARPRUNE_CACHE``, else ``$XDG_CACHE_HOME/carprune``, else ``~/.cache/carprune``."""
    root = os.environ.get("CARPRUNE_CACHE")
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(root) if root else xdg / "carprune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_key(path: Path, *extra: str) -> str:
    """A key that changes when the source file changes (absolute path, size, mtime)."""
    st = path.stat()
    text = "|".join([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), *extra])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz through a temporary file and a rename: never a half-written cache."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)
