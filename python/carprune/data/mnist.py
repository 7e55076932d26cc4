"""The 5,000-digit MNIST sample shipped in ../shared/data/mnist_5k.npz."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .arrays import ImageArrayDataset

MNIST_CLASSES = tuple(str(d) for d in range(10))
TEST_PER_CLASS = 100


def mnist5k(path: str | os.PathLike = "../shared/data/mnist_5k.npz", split: str = "train"
            ) -> ImageArrayDataset:
    """MNIST digits scaled to [0, 1]. Split, fixed and stratified: of each digit's 500 images
    (in file order) the last 100 are 'test' (1,000 images), the first 400 'train' (4,000);
    'all' is all 5,000.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file not found: {path}")
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
        raise ValueError(f"{path} is not a valid MNIST .npz with 'x' and 'y' ({exc})") from exc
    if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: expected x uint8 [N, 28, 28] and y [N], got {x.shape} {y.shape}")
    if split != "all":
        keep = split_mask(y, split)
        x, y = x[keep], y[keep]
    return ImageArrayDataset(x, y.astype(np.int64), MNIST_CLASSES, (0.0,), (1.0,))


def read_mnist5k(path: str | os.PathLike = "../shared/data/mnist_5k.npz"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits in file order: x uint8 [5000, 28, 28], y int64 [5000]."""
    ds = mnist5k(path, "all")
    return ds.images[..., 0], ds.labels


def split_mask(y: np.ndarray, split: str) -> np.ndarray:
    """bool [N]: the images of `split` ('train', 'test' or 'all') among labels `y` in file order:
    of each digit's images the last 100 are 'test', the others 'train'."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return np.ones(len(y), dtype=bool)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[idx[-TEST_PER_CLASS:]] = True
    return test if split == "test" else ~test
