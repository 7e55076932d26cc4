"""carprune.data.cache: the cache directory follows $CARPRUNE_CACHE (else $XDG_CACHE_HOME), decoded
images land there, and the first write is logged once with the directory."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import carprune as cp
from carprune.data import cache
from carprune.data.folder import load_images
from carprune.logging_utils import log


@pytest.fixture
def records():
    """The carprune logger's records at INFO (CLI tests may have set its level or propagation)."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield got
    log.removeHandler(handler)
    log.setLevel(level)


def image_folder(root: Path, cifar_test: cp.data.ImageArrayDataset, n: int = 12) -> np.ndarray:
    """An ImageFolder of `n` CIFAR-10 test images (PNG: lossless), classes a and b."""
    images = np.asarray(cifar_test.images[:n])
    for i, im in enumerate(images):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:02d}.png")
    return images


def test_decoded_images_are_cached_in_carprune_cache(tmp_path, monkeypatch, cifar_test, records):
    where = tmp_path / "my cache"
    monkeypatch.setenv("CARPRUNE_CACHE", str(where))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    images = image_folder(tmp_path / "imgs", cifar_test)
    assert cache.cache_dir() == where
    first = load_images(tmp_path / "imgs")
    files = list(where.glob("images-*.npz"))
    assert len(files) == 1 and not (tmp_path / "xdg").exists()
    with np.load(files[0]) as z:  # the decoded images, in folder order: a (even), then b (odd)
        assert np.array_equal(z["images"], np.concatenate([images[0::2], images[1::2]]))
        assert z["labels"].tolist() == [0] * 6 + [1] * 6
    said = [r.getMessage() for r in records if "caching" in r.getMessage()]
    assert said == [f"caching {files[0].name} in {where.resolve()} (decoded once, reused later; "
                    "set CARPRUNE_CACHE to use another directory)"]
    # a second data set into the same directory is not announced again; a reload reuses the file
    load_images(tmp_path / "imgs", classes=["b", "a"])
    assert len(list(where.glob("images-*.npz"))) == 2
    again = load_images(tmp_path / "imgs")
    assert len(list(where.glob("images-*.npz"))) == 2
    assert np.array_equal(again.images, first.images)
    assert len([r for r in records if "caching" in r.getMessage()]) == 1


def test_cache_dir_falls_back_to_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CARPRUNE_CACHE", "")  # empty counts as unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "carprune"
    assert (tmp_path / "xdg" / "carprune").is_dir()
    monkeypatch.delenv("CARPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "carprune"
