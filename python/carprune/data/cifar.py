"""CIFAR-10 from an archive of JPEG files laid out as ImageFolder (``split/class/NNNN.jpg``)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .arrays import ImageArrayDataset
from .cache import atomic_save_npz, cache_dir, source_key

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# The normalisation the shared pretrained ResNets were trained with.
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)


def read_image_tar(path: Path, split: str | None, classes: tuple[str, ...] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image under ``[split/]class/`` in a (gzipped) tar of an ImageFolder tree.

    Returns uint8 images [N, H, W, C], labels [N] and the class names (sorted, unless given).
    """
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115  (closed by the `with tar` below)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable tar archive ({exc})") from exc
    items: list[tuple[str, str, bytes]] = []
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = Path(member.name).parts
                if split is not None:
                    if len(parts) < 3 or parts[-3] != split:
                        continue
                elif len(parts) < 2:
                    continue
                f = tar.extractfile(member)
                assert f is not None
                items.append((parts[-2], member.name, f.read()))
    except (tarfile.TarError, OSError, EOFError, Exception) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if not items:
        raise ValueError(f"{path} holds no images" + (f" under '{split}/'" if split else ""))
    return decode_class_images(
        path, [(c, name, lambda blob=blob: io.BytesIO(blob)) for c, name, blob in items], classes)


def decode_class_images(src: Path, items: Sequence[tuple[str, str, Callable[[], Any]]],
                        classes: Sequence[str] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode (class folder, image name, opener) items of an ImageFolder tree, in class then name
    order: RGB uint8 images [N, H, W, 3], labels [N], class names (sorted, unless given)."""
    names = list(classes) if classes is not None else sorted({c for c, _, _ in items})
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({c for c, _, _ in items} - set(index))
    if unknown:
        raise ValueError(f"{src}: unexpected class folders {unknown}; expected {names}")
    items = sorted(items, key=lambda t: (index[t[0]], t[1]))
    images = []
    for _, name, opener in items:
        try:
            with Image.open(opener()) as im:
                images.append(np.asarray(im.convert("RGB")))
        except Exception as exc:
            raise ValueError(f"{src}: image {name} cannot be decoded ({exc})") from exc
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{src}: images differ in size {sorted(shapes)[:4]}; resize them first")
    labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return np.stack(images), labels, names


def cifar10(path: str | os.PathLike = "../shared/data/cifar10-jpeg.tar.gz", split: str = "test"
            ) -> ImageArrayDataset:
    """CIFAR-10 ``split`` ('train' 50,000 or 'test' 10,000 images), normalised as for the shared
    pretrained ResNets. Decoding takes seconds; the decoded arrays are cached (see `cache_dir`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found: {path}")
    cached = cache_dir() / f"cifar10-{split}-{source_key(path)}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as z:
                images, labels = z["images"], z["labels"]
        except Exception:
            cached.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
            return cifar10(path, split)
    else:
        images, labels, _ = read_image_tar(path, split, CIFAR10_CLASSES)
        atomic_save_npz(cached, images=images, labels=labels)
    return ImageArrayDataset(images, labels, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD)
