"""Atomic writes: the final file appears whole or not at all, with the permissions of open()."""

import os
import stat

import pytest

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
