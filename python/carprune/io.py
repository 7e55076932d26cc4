"""Atomic file writes (results are written to a temporary file and renamed, so an interrupted
run never leaves a half-written file under the final name), atomic replacement of directories
and of a directory's contents, run fingerprints (may a run resume from what is on disk?), and
safe reading of torch files."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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


# -- directories ---------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE). False where the
    C library, kernel or file system does not offer it (nothing was changed then)."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move `src` (a file or a directory) to `dst`, replacing what is there.

    A file, or a `dst` that does not exist, is replaced by one rename. An existing directory is
    exchanged with `src` in one step where the system can (Linux renameat2 RENAME_EXCHANGE), so a
    reader always finds either the old or the new `dst`, then the old tree is deleted. Elsewhere
    the old directory is first renamed aside (a reader may then briefly find no `dst`, never a
    mixture of the two). A symlink at `dst` is replaced, not followed. Both paths must be on one
    file system.
    """
    src, dst = Path(src), Path(dst)
    if not (dst.is_dir() and not dst.is_symlink()):
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)   # src now names the old tree
        return
    aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def update_directory(out: str | os.PathLike, write: Callable[[Path], Any], last: str) -> None:
    """Write a set of files into directory `out` so that a reader never sees a half-written one.

    `write(tmp)` writes every file (and subdirectory) into a fresh temporary directory inside
    `out`; each is then moved into place with `replace_path`, the one named `last` (the file
    that marks the output complete, e.g. result.json) at the end. An older `last` is deleted
    before anything is replaced, so it never describes newer files. Entries of `out` that
    `write` does not produce are left alone; on failure the temporary directory is removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".update-"))
    try:
        write(tmp)
        if not (tmp / last).exists():
            raise FileNotFoundError(f"update of {out}: the writer produced no {last}")
        (out / last).unlink(missing_ok=True)
        for p in sorted(tmp.iterdir()):
            if p.name != last:
                replace_path(p, out / p.name)
        os.replace(tmp / last, out / last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- run identity ----------------------------------------------------------------------------------
def fingerprint(obj: Any) -> str:
    """A short digest of `obj` (JSON types; other values by str()): the identity of a run's
    settings. Key order does not matter; a tuple and a list of the same items digest the same."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(named: Iterable[tuple[str, Any]]) -> str:
    """A digest of named tensors' names, dtypes, shapes and values (e.g. a model's
    ``state_dict().items()``): the identity of what a run computed with."""
    import torch

    h = hashlib.sha256()
    for name, t in named:
        t = torch.as_tensor(t).detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_CONTENT: dict[tuple[str, int, int, int], str] = {}   # (path, size, mtime, inode) -> sha256


def _content_digest(p: Path, st: os.stat_result) -> str:
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _CONTENT:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _CONTENT[key] = h.hexdigest()[:16]
    return _CONTENT[key]


def tree_digest(root: Path, keep: Callable[[str], bool] | None = None) -> str:
    """A digest of the files under `root` (those whose name `keep` accepts, default all): each
    one's path relative to `root`, size and mtime, in a fixed order; not `root`'s own path."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            if keep is None or keep(f):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{(rel / f).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def file_identity(path: str | os.PathLike | None) -> Any:
    """A file or directory a run reads, for a fingerprint: a resumed run must read the same
    files. A file is ["file", size, SHA-256 of its contents], so the same file copied elsewhere
    (node-local scratch) or touched still resumes, and an edited one does not; each file is read
    once per process. A directory (an ImageFolder tree) is ["dir", a digest of every file's
    relative path, size and mtime]: it resumes where copies keep mtimes (``rsync -a``,
    ``cp -p``). A missing path is its string; None stays None."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return str(p)
    if p.is_dir():
        return ["dir", tree_digest(p)]
    st = p.stat()
    return ["file", st.st_size, _content_digest(p, st)]


def config_difference(old: Any, new: Mapping[str, Any]) -> str:
    """What differs between a recorded run's settings `old` and this run's `new` (JSON-like
    dicts), as "key: recorded -> now" items for an error message; "no settings recorded" when
    `old` is not a dict."""
    if not isinstance(old, dict):
        return "no settings recorded"
    new = json.loads(json.dumps(new, sort_keys=True, default=str))
    items = [f"{k}: {json.dumps(old.get(k, '(none)'), default=str)} -> "
             f"{json.dumps(new.get(k, '(none)'), default=str)}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(items) if items else "the same settings, another fingerprint version"


def same_run(path: str | os.PathLike, fp: str, what: str = "record", *, strict: bool = False
             ) -> bool | None:
    """Whether the JSON record at `path` (a checkpoint, a scores.json, a checkpoint's settings)
    was written by a run with fingerprint `fp` (its "fingerprint" key).

    None: there is no record to resume from: no file, or (unless `strict`) a file that is not
    readable JSON. With `strict` an unreadable record raises read_json's ValueError naming it.
    False: a record of another run (or one without a fingerprint). The one test every resume
    check uses; what a mismatch means (start over, refuse) is the caller's decision.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = read_json(path, what)
    except ValueError:
        if strict:
            raise
        return None
    return isinstance(doc, dict) and doc.get("fingerprint") == fp


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
