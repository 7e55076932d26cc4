"""In-memory image datasets: decoded uint8 images plus labels, normalised on access.

Keeping uint8 arrays (not float tensors) holds CIFAR-10's 60,000 images in 184 MB, and
`batch()` normalises a whole index set in one vectorised step, which the scoring engine uses
instead of per-item `__getitem__` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageArrayDataset(Dataset):
    """Images ``[N, H, W, C]`` (or ``[N, H, W]``) uint8 and int64 labels, normalised per channel.

    Items are ``(image float32 [C, H, W], label int)`` with ``image = (x / 255 - mean) / std``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}], got shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(
                f"labels must lie in [0, {len(classes)}), got [{labels.min()}, {labels.max()}]"
            )
        c = images.shape[3]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values (one per channel)")
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        n, h, w, c = self.images.shape
        return (c, h, w)

    def batch(self, indices: np.ndarray | Sequence[int] | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images ``[n, C, H, W]`` float32 and labels ``[n]`` int64 for `indices`."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[indices]))
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std).contiguous()
        return x, torch.from_numpy(np.ascontiguousarray(self.labels[indices]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch([int(i)])
        return x[0], int(y[0])

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageArrayDataset:
        """A dataset over the given indices (same classes and normalisation)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageArrayDataset(self.images[idx], self.labels[idx], self.classes, self.mean,
                                 self.std)

    def sample(self, n: int, seed: int = 0) -> ImageArrayDataset:
        """A seeded random subset of `n` images (archives are often ordered by class)."""
        if not 0 < n <= len(self):
            raise ValueError(f"cannot sample {n} images from a dataset of {len(self)}")
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), size=n, replace=False)))

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple[ImageArrayDataset, ImageArrayDataset]:
        """Two disjoint seeded random parts (e.g. CAR's score half and hold-out half)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        perm = np.random.default_rng(seed).permutation(len(self))
        k = int(round(fraction * len(self)))
        return self.subset(np.sort(perm[:k])), self.subset(np.sort(perm[k:]))
