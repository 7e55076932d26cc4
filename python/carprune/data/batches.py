"""Uniform batch access to the datasets users pass: our ImageArrayDataset (vectorised), a pair of
tensors (images, labels), or any map-style torch Dataset of (image, label) items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .arrays import ImageArrayDataset

DataLike = Any  # ImageArrayDataset | tuple[Tensor, Tensor] | torch.utils.data.Dataset


def num_items(data: DataLike) -> int:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        if data[0].shape[0] != data[1].shape[0]:
            raise ValueError(f"images and labels differ in length: {data[0].shape[0]} vs "
                             f"{data[1].shape[0]}")
        return int(data[0].shape[0])
    try:
        return len(data)
    except TypeError as exc:
        raise TypeError(f"data must be a Dataset of (image, label) or a tuple (images, labels), "
                        f"got {type(data).__name__}") from exc


def load_batch(data: DataLike, indices: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, ...] float and labels [n] int64 for `indices`."""
    idx = np.asarray(indices, dtype=np.int64)
    if isinstance(data, ImageArrayDataset):
        return data.batch(idx)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        t = torch.from_numpy(idx)
        return data[0][t], torch.as_tensor(data[1])[t].long()
    xs, ys = [], []
    for i in idx.tolist():
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise TypeError(f"dataset items must be (image, label) pairs, got {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]))
        ys.append(int(item[1]))
    try:
        x = torch.stack(xs)
    except RuntimeError as exc:
        raise ValueError(f"dataset images differ in shape ({exc})") from exc
    return x, torch.tensor(ys, dtype=torch.int64)


def class_names(data: DataLike, num_classes: int) -> list[str]:
    names = getattr(data, "classes", None)
    if names is not None and len(names) == num_classes:
        return [str(c) for c in names]
    return [str(c) for c in range(num_classes)]


def pick_indices(n_total: int, num_images: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random subset of `num_images` (sorted, for locality)."""
    if n_total == 0:
        raise ValueError("the dataset is empty: nothing to score")
    if num_images is None or num_images >= n_total:
        return np.arange(n_total, dtype=np.int64)
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=num_images, replace=False)).astype(np.int64)
