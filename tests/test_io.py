"""Atomic writes: the final file appears whole or not at all, with the permissions of open();
directories replaced whole (a reader finds the old or the new one, never a mixture), a
directory's files updated with its completion marker last; run fingerprints and the one resume
check (`same_run`)."""

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from carprune import io as cio
from carprune.io import atomic_write, read_json, write_json


def test_write_json_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert read_json(tmp_path / "a.json") == {"x": 1}


def test_failed_write_leaves_nothing(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", boom)
    assert read_json(tmp_path / "a.json") == {"x": 1}   # the old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left


def test_read_json_names_truncated_file(tmp_path):
    (tmp_path / "r.json").write_text('{"trajectory": [1, 2')
    with pytest.raises(ValueError, match=r"checkpoint .*r\.json is not valid JSON"):
        read_json(tmp_path / "r.json", "checkpoint")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_json(tmp_path / "missing.json", "checkpoint")


# -- directories -----------------------------------------------------------------------------------
def _tree(d):
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "aside"])
def test_replace_path_swaps_a_directory_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(cio, "_exchange", lambda a, b: False)
    dst, src = tmp_path / "model", tmp_path / "new"
    dst.mkdir()
    (dst / "weights.pt").write_text("old")
    (dst / "only-old.json").write_text("{}")
    src.mkdir()
    (src / "weights.pt").write_text("new")
    (src / "sub").mkdir()
    (src / "sub" / "x").write_text("y")
    cio.replace_path(src, dst)
    assert _tree(dst) == {"weights.pt": "new", "sub/x": "y"}     # nothing of the old tree left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no aside copy, no src
    # a file, and a missing destination, are plain renames
    (tmp_path / "f").write_text("1")
    (tmp_path / "g").write_text("2")
    cio.replace_path(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "1" and not (tmp_path / "f").exists()
    cio.replace_path(tmp_path / "g", tmp_path / "h")
    assert (tmp_path / "h").read_text() == "1"


def test_replace_path_never_leaves_the_directory_missing(tmp_path):
    """With renameat2's exchange a reader polling the directory always finds a whole one: the
    old or the new, never none (the fallback cannot promise that; this asserts the exchange)."""
    import threading

    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "probe2").mkdir()
    if not cio._exchange(probe, tmp_path / "probe2"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system/file system; "
                    "replace_path falls back to rename-aside there (tested above)")
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "v").write_text("0")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append((dst / "v").read_text())
            except FileNotFoundError:
                seen.append(None)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for i in range(1, 200):
            src = tmp_path / f"n{i}"
            src.mkdir()
            (src / "v").write_text(str(i))
            cio.replace_path(src, dst)
    finally:
        stop.set()
        th.join()
    assert (dst / "v").read_text() == "199"
    assert None not in seen and len(seen) > 0
    assert [int(v) for v in seen] == sorted(int(v) for v in seen)   # never back to an older one


def test_update_directory_puts_the_marker_last_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"old": 1}')
    (out / "model").mkdir()
    (out / "model" / "weights.pt").write_text("old")
    (out / "run.json").write_text("{}")             # not the writer's: left alone
    order = []
    real = cio.replace_path

    def spy(src, dst):
        order.append(Path(dst).name)
        assert not (out / "result.json").exists()   # the old marker goes before anything changes
        real(src, dst)

    def write(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.pt").write_text("new")
        write_json(tmp / "result.json", {"new": 1})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cio, "replace_path", spy)
        cio.update_directory(out, write, last="result.json")
    assert order == ["model"]
    assert read_json(out / "result.json") == {"new": 1}
    assert _tree(out) == {"model/weights.pt": "new", "result.json": '{\n  "new": 1\n}',
                          "run.json": "{}"}

    def fails(tmp):
        (tmp / "model").mkdir()
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        cio.update_directory(out, fails, last="result.json")
    assert _tree(out)["model/weights.pt"] == "new" and read_json(out / "result.json") == {"new": 1}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary left
    with pytest.raises(FileNotFoundError, match="produced no result.json"):
        cio.update_directory(out, lambda tmp: None, last="result.json")
    assert read_json(out / "result.json") == {"new": 1}


# -- run identity ----------------------------------------------------------------------------------
def test_fingerprint_ignores_key_order_and_list_kind():
    a = cio.fingerprint({"mean": [0.5, 0.25], "seed": 0, "weights": None})
    assert a == cio.fingerprint({"weights": None, "seed": 0, "mean": (0.5, 0.25)})
    assert a != cio.fingerprint({"mean": [0.5, 0.25], "seed": 1, "weights": None})
    assert len(a) == 16 and int(a, 16) >= 0


def test_file_identity_follows_contents_not_place_or_time(tmp_path):
    f = tmp_path / "w.pt"
    assert cio.file_identity(None) is None and cio.file_identity(f) == str(f)
    f.write_bytes(b"abc")
    first = cio.file_identity(f)
    assert first == ["file", 3, hashlib.sha256(b"abc").hexdigest()[:16]]
    st = f.stat()
    os.utime(f, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))   # touched: the same file
    assert cio.file_identity(f) == first
    (tmp_path / "scratch").mkdir()
    copy = shutil.copy(f, tmp_path / "scratch" / "w.pt")   # copied to node-local scratch
    assert cio.file_identity(copy) == first
    f.write_bytes(b"abd")                                  # edited, same size
    assert cio.file_identity(f) != first
    # a directory: every file's relative path, size and mtime (copies that keep mtimes resume)
    d = tmp_path / "imgs"
    (d / "cat").mkdir(parents=True)
    (d / "cat" / "0.jpg").write_bytes(b"x" * 10)
    tree = cio.file_identity(d)
    assert tree[0] == "dir" and cio.file_identity(shutil.copytree(d, tmp_path / "c2")) == tree
    (d / "cat" / "1.jpg").write_bytes(b"y")
    assert cio.file_identity(d) != tree


def test_config_difference_names_what_changed():
    old = {"seed": 0, "model_state": "aa", "layer": "conv2"}
    assert cio.config_difference(old, {"seed": 0, "model_state": "bb", "layer": "conv2"}) == \
        'model_state: "aa" -> "bb"'
    assert cio.config_difference(old, {"seed": 1, "layer": "conv2", "x": (1, 2)}) == \
        'model_state: "aa" -> "(none)"; seed: 0 -> 1; x: "(none)" -> [1, 2]'
    assert cio.config_difference(None, old) == "no settings recorded"


def test_tensor_digest_sees_values_dtypes_shapes_and_names():
    t = torch.arange(6, dtype=torch.float32)
    a = cio.tensor_digest([("w", t)])
    assert a == cio.tensor_digest([("w", t.clone())]) and len(a) == 16
    assert a == cio.tensor_digest([("w", t.view(2, 3).t().contiguous().t().reshape(-1))])
    one_ulp = torch.where(t == 5, torch.nextafter(t, t + 1), t)
    for other in ([("w", one_ulp)], [("w", t.double())], [("w", t.view(2, 3))], [("v", t)]):
        assert cio.tensor_digest(other) != a
    assert cio.tensor_digest([("s", torch.tensor(1.5))]) != cio.tensor_digest([("s", torch.tensor(2.5))])


def test_same_run(tmp_path):
    rec = tmp_path / "checkpoint.json"
    assert cio.same_run(rec, "abc") is None                      # nothing to resume
    write_json(rec, {"fingerprint": "abc", "trajectory": []})
    assert cio.same_run(rec, "abc") is True
    assert cio.same_run(rec, "abd") is False
    write_json(rec, {"trajectory": []})
    assert cio.same_run(rec, "abc") is False                     # no fingerprint: not ours
    rec.write_text('{"fingerprint": "abc", "traj')               # torn by a crash
    assert cio.same_run(rec, "abc") is None
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint\.json is not valid JSON"):
        cio.same_run(rec, "abc", "checkpoint", strict=True)
