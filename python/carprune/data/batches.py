"""Uniform batch access to the data users pass: our ImageArrayDataset (vectorised), a pair
(images, labels) of tensors or numpy arrays, any map-style torch Dataset of (image, label) items
(a Subset or ConcatDataset of one included), or a DataLoader over any of these.

A DataLoader is read through its dataset by index: scoring and evaluation pick their own seeded
subsets and batches, and training (`training.train`) draws its own seeded batches, so the
loader's batch size, sampler and shuffling do not matter. A loader with its own collate_fn, or
over an IterableDataset, is iterated once and held in memory as a pair of tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Subset
from torch.utils.data._utils.collate import default_collate

from ..callbacks import log
from .arrays import ImageArrayDataset

DataLike = Any  # ImageArrayDataset | (images, labels) | torch Dataset | DataLoader

_MATERIALISED: weakref.WeakKeyDictionary[DataLoader, tuple[torch.Tensor, torch.Tensor]] = \
    weakref.WeakKeyDictionary()


def _is_pair(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data))


def resolve(data: DataLike) -> DataLike:
    """`data` in a form read by index: a DataLoader becomes its dataset (or, with a custom
    collate_fn or an IterableDataset, the tensors it yields, read once); a numpy pair becomes a
    tensor pair (without copying). Other data is returned as it is."""
    if isinstance(data, DataLoader):
        if not isinstance(data.dataset, IterableDataset) and data.collate_fn is default_collate:
            return resolve(data.dataset)
        if data not in _MATERIALISED:
            xs, ys = [], []
            for batch in data:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise TypeError("DataLoader batches must be (images, labels), got "
                                    f"{type(batch).__name__}")
                xs.append(torch.as_tensor(batch[0]))
                ys.append(torch.as_tensor(batch[1]))
            if not xs:
                raise ValueError("the DataLoader yields no batches: nothing to read")
            _MATERIALISED[data] = (torch.cat(xs), torch.cat(ys).long())
        return _MATERIALISED[data]
    if _is_pair(data) and any(isinstance(t, np.ndarray) for t in data):
        return tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in data)
    return data


def num_items(data: DataLike) -> int:
    data = resolve(data)
    if _is_pair(data):
        if data[0].shape[0] != data[1].shape[0]:
            raise ValueError(f"images and labels differ in length: {data[0].shape[0]} vs "
                             f"{data[1].shape[0]}")
        return int(data[0].shape[0])
    try:
        return len(data)
    except TypeError as exc:
        raise TypeError("data must be a Dataset of (image, label) items, a DataLoader, or a pair "
                        f"(images, labels) of tensors or arrays, got {type(data).__name__}") from exc


def _targets(t: torch.Tensor) -> torch.Tensor:
    """Class labels as int64; floating-point (regression) targets kept as they are."""
    return t if t.is_floating_point() else t.long()


def load_batch(data: DataLike, indices: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, ...] float and labels [n] int64 for `indices` (floating-point targets, for
    regression, stay floating point: [n] or [n, D])."""
    idx = np.asarray(indices, dtype=np.int64)
    data = resolve(data)
    if isinstance(data, ImageArrayDataset):
        return data.batch(idx)
    if _is_pair(data):
        t = torch.from_numpy(idx)
        return data[0][t], _targets(torch.as_tensor(data[1])[t])
    xs, ys = [], []
    for i in idx.tolist():
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise TypeError(f"dataset items must be (image, label) pairs, got {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    try:
        x = torch.stack(xs)
    except RuntimeError as exc:
        raise ValueError(f"dataset images differ in shape ({exc})") from exc
    return x, _targets(torch.stack(ys))


def load_targets(data: DataLike, indices: np.ndarray | Sequence[int], rows: int = 512) -> torch.Tensor:
    """The labels (or regression targets) of `indices`, without decoding images where the data
    holds them apart (array datasets, pairs); otherwise read in batches of `rows`."""
    idx = np.asarray(indices, dtype=np.int64)
    data = resolve(data)
    if isinstance(data, ImageArrayDataset):
        return _targets(torch.from_numpy(np.ascontiguousarray(data.labels[idx])))
    if _is_pair(data):
        return _targets(torch.as_tensor(data[1])[torch.from_numpy(idx)])
    parts = [load_batch(data, idx[s:s + rows])[1] for s in range(0, len(idx), rows)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def dataset_classes(data: DataLike) -> list[str] | None:
    """The class names `data` carries (``.classes``), looking through DataLoaders, Subsets and
    ConcatDatasets whose parts agree; None when there are none."""
    names = getattr(data, "classes", None)
    if names is not None:
        return [str(c) for c in names]
    if isinstance(data, DataLoader | Subset):
        return dataset_classes(data.dataset)
    if isinstance(data, ConcatDataset) and data.datasets:
        parts = [dataset_classes(d) for d in data.datasets]
        return parts[0] if all(p == parts[0] for p in parts) else None
    return None


def class_names(data: DataLike, num_classes: int, classes: Sequence[str] | None = None) -> list[str]:
    """Names of the `num_classes` classes: `classes` if given, else those `data` carries, else
    the label numbers."""
    if classes is not None:
        if len(classes) != num_classes:
            raise ValueError(f"classes names {len(classes)} classes but the model has "
                             f"{num_classes} outputs")
        return [str(c) for c in classes]
    names = dataset_classes(data)
    if names is not None and len(names) == num_classes:
        return names
    return [str(c) for c in range(num_classes)]


def data_digest(data: DataLike, num_images: int | None = None, seed: int = 0,
                rows: int = 512) -> str:
    """A digest of the images and targets a run reads from `data`: those of
    ``pick_indices(num_items(data), num_images, seed)``, the seeded subset every scorer and
    evaluator of this package draws (so a checkpoint can tell other data from the same)."""
    from ..io import tensor_digest

    n = num_items(data)
    idx = pick_indices(n, num_images if num_images is not None and num_images < n else None, seed)

    def parts():
        yield "indices", torch.from_numpy(idx)
        for i in range(0, len(idx), rows):
            x, y = load_batch(data, idx[i:i + rows])
            yield "x", x
            yield "y", y

    return tensor_digest(parts())


def run_identity(model: Any, score_data: DataLike, score_images: int | None,
                 eval_data: DataLike | None, eval_images: int | None, seed: int
                 ) -> dict[str, str | None]:
    """What a checkpoint records so that only the same run resumes from it: digests of the
    model's state (`io.tensor_digest`) and of the scoring and hold-out images the run reads
    (`data_digest`)."""
    from ..io import tensor_digest

    return {"model_state": tensor_digest(model.state_dict().items()),
            "score_data": data_digest(score_data, score_images, seed),
            "eval_data": None if eval_data is None else data_digest(eval_data, eval_images, seed)}


def pick_indices(n_total: int, num_images: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random subset of `num_images` (sorted, for locality)."""
    if n_total == 0:
        raise ValueError("the dataset is empty: nothing to score")
    if num_images is not None and num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if num_images is None or num_images >= n_total:
        if num_images is not None and num_images > n_total:
            log.warning("num_images=%d but the data holds %d images: using all %d",
                        num_images, n_total, n_total)
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=num_images, replace=False)).astype(np.int64)
