"""Image data from disk as an ImageArrayDataset: an ImageFolder directory (``[split/]class/img``),
a tar of one (optionally gzipped), or an ``.npz`` of images and labels.

Decoded images are cached as uint8 arrays (keyed by the source's path, size and modification
time), because decoding tens of thousands of JPEGs takes longer than scoring a small layer. A
source whose top level holds splits (``train/``, ``test/``) needs ``split``: reading both into
one set would silently score on training images. The shared CIFAR-10 archive is recognised by
its class folders and gets its class order and its models' normalisation when none is given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import tree_digest
from .arrays import ImageArrayDataset
from .cache import atomic_save_npz, cache_dir, source_key
from .cifar import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, decode_class_images, read_image_tar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
CACHE_VERSION = "1"

log = logging.getLogger("carprune")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in
                                  (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


# -- layout --------------------------------------------------------------------------------------
def _splits_of(rel_paths: Sequence[tuple[str, ...]]) -> list[str]:
    """The split names when image files sit at ``.../split/class/file`` under more than one
    distinct ``split`` (a single prefix folder is just a wrapper, not a split)."""
    tops = {p[-3] for p in rel_paths if len(p) >= 3}
    return sorted(tops) if len(tops) > 1 else []


def _choose(rel_paths: list[tuple[str, ...]], split: str | None, src: Path) -> str | None:
    splits = _splits_of(rel_paths)
    if split is None:
        if splits:
            raise ValueError(f"{src} holds the splits {', '.join(splits)}: choose one with --split "
                             "(split = ... in the config)")
        return None
    tops = {p[-3] for p in rel_paths if len(p) >= 3}
    if split not in tops:
        have = ", ".join(sorted(tops)) if tops else "none (class folders at the top level)"
        raise ValueError(f"{src} has no split {split!r}; its splits: {have}")
    return split


def _tar_names(path: Path) -> list[tuple[str, ...]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            return [Path(m.name).parts for m in tar if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable tar archive ({exc})") from exc


def _dir_files(root: Path) -> list[tuple[str, ...]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).parts
        out.extend((*rel, f) for f in sorted(filenames) if _is_image(f))
    return out


def read_image_dir(root: Path, split: str | None, classes: Sequence[str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``root/[split/]class/*`` (RGB uint8 [N, H, W, 3]), in class then file-name order."""
    files = [p for p in _dir_files(root) if len(p) >= 2]
    if split is not None:
        files = [p for p in files if len(p) >= 3 and p[-3] == split]
    if not files:
        raise ValueError(f"{root} holds no images in class folders"
                         + (f" under '{split}/'" if split else ""))
    return decode_class_images(
        root, [(p[-2], "/".join(p), lambda p=p: root.joinpath(*p)) for p in files], classes)


def read_npz(path: Path, split: str | None) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Images and labels from an .npz: keys ``x``/``images`` and ``y``/``labels`` (with
    ``_<split>`` appended when a split is chosen), optional ``classes`` (strings)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from exc
    suffix = f"_{split}" if split else ""
    xk = next((k + suffix for k in ("x", "images") if k + suffix in arrays), None)
    yk = next((k + suffix for k in ("y", "labels") if k + suffix in arrays), None)
    if xk is None or yk is None:
        want = f"x{suffix}/images{suffix} and y{suffix}/labels{suffix}"
        raise ValueError(f"{path} needs arrays {want}; it has {', '.join(arrays)}")
    x, y = arrays[xk], arrays[yk]
    classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else None
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0..255), got {x.dtype}; store them as "
                         "uint8 so the configured mean/std mean what they say")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    if x.ndim not in (3, 4):
        raise ValueError(f"{path}: images must be [N, H, W] or [N, H, W, C], got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers [{x.shape[0]}], got {y.dtype} {y.shape}")
    return x, y.astype(np.int64), classes


# -- channels ------------------------------------------------------------------------------------
def to_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """[N, H, W, C] with C = `channels` (None: as stored). RGB to grey uses PIL's integer
    ITU-R 601 formula, so a folder of grey PNGs gives the same pixels either way."""
    if images.ndim == 3:
        images = images[..., None]
    c = images.shape[3]
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=3)
    if channels == 1 and c == 3:
        r, g, b = (images[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


# -- caching -------------------------------------------------------------------------------------
def _dir_key(root: Path, *extra: str) -> str:
    """The decode cache's key of an image directory: its path and its images' `io.tree_digest`."""
    text = "|".join([str(root.resolve()), tree_digest(root, _is_image), *extra])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _decode(path: Path, split: str | None, classes: Sequence[str] | None
            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if path.is_dir():
        split = _choose(_dir_files(path), split, path)
        return read_image_dir(path, split, classes)
    split = _choose(_tar_names(path), split, path)
    if classes is None:
        # read_image_tar sorts class names; keep that, but give CIFAR-10 its canonical order
        images, labels, names = read_image_tar(path, split, None)
        if set(names) == set(CIFAR10_CLASSES):
            remap = np.array([CIFAR10_CLASSES.index(n) for n in names], dtype=np.int64)
            return images, remap[labels], list(CIFAR10_CLASSES)
        return images, labels, names
    return read_image_tar(path, split, tuple(classes))


def read_images(path: str | os.PathLike, split: str | None = None,
                classes: Sequence[str] | None = None, cache: bool = True
                ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Decoded uint8 images, int64 labels and class names (None when an .npz names none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file() and path.name.lower().endswith(".npz"):
        return read_npz(path, split)
    if not (path.is_dir() or _is_tar(path)):
        raise ValueError(f"{path}: data must be an ImageFolder directory, a .tar[.gz] of one, "
                         "or an .npz of images and labels")
    extra = (CACHE_VERSION, split or "", ",".join(classes) if classes is not None else "")
    key = _dir_key(path, *extra) if path.is_dir() else source_key(path, *extra)
    cached = cache_dir() / f"images-{key}.npz" if cache else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return z["images"], z["labels"], [str(c) for c in z["classes"].tolist()]
        except Exception:
            cached.unlink(missing_ok=True)  # damaged cache: decode again
    images, labels, names = _decode(path, split, classes)
    if cached is not None:
        atomic_save_npz(cached, images=images, labels=labels, classes=np.array(names))
    return images, labels, names


def load_images(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    channels: int | None = None,
    cache: bool = True,
) -> ImageArrayDataset:
    """An ImageArrayDataset from a folder, tar or .npz, normalised as ``(x / 255 - mean) / std``.

    `classes` fixes the class order (folder names; default sorted, CIFAR-10's own order for
    its classes); a single mean/std value applies to every channel. Without mean/std, CIFAR-10
    gets the shared models' normalisation and anything else is only scaled to [0, 1] (logged,
    since a model trained with another normalisation then loses accuracy for no visible reason).
    """
    images, labels, names = read_images(path, split, classes, cache)
    images = to_channels(images, channels)
    c = images.shape[3]
    if names is None:
        names = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
    elif classes is not None and list(classes) != list(names):
        raise ValueError(f"{path}: its classes {names} differ from the configured {list(classes)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{path}: labels must lie in [0, {len(names)}), got "
                         f"[{labels.min()}, {labels.max()}]")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (or neither)")
    if mean is None:
        if tuple(names) == CIFAR10_CLASSES and c == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
            log.info("%s: CIFAR-10 classes, using its normalisation mean %s std %s", path, mean, std)
        else:
            mean, std = (0.0,) * c, (1.0,) * c
            log.warning("%s: no normalisation configured (mean/std); images are only scaled to "
                        "[0, 1]", path)
    mean, std = list(mean), list(std)
    for what, v in (("mean", mean), ("std", std)):
        if len(v) == 1:
            v *= c
        if len(v) != c:
            raise ValueError(f"{what} needs 1 or {c} values for {c}-channel images, got {len(v)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")
    return ImageArrayDataset(images, labels, names, mean, std)

