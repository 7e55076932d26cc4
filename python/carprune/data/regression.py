"""Regression data: images with floating-point targets, and the rotated-MNIST angle task.

`rotated_mnist5k` rotates each of the 5,000 digits of ../shared/data/mnist_5k.npz by its own
seeded random angle, uniform in [-max_angle, max_angle] degrees (counter-clockwise positive), and
asks for the angle: a real regression task on real images for RAR (regression accuracy reduction,
the CAR paper's proposed extension). The angle of digit i depends only on the seed and i, so the
'train' and 'test' splits (mnist5k's) and 'all' agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .arrays import ImageArrayDataset
from .mnist import read_mnist5k, split_mask

MAX_ANGLE = 60.0


class TargetArrayDataset(ImageArrayDataset):
    """Like `ImageArrayDataset`, but each image has a float32 target (``[N]`` or ``[N, D]``) instead
    of a class label: items are ``(image float32 [C, H, W], target float32 tensor)`` and `batch`
    returns float targets. It has no classes (``classes == []``)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        targets = np.asarray(targets, dtype=np.float32)
        n = np.asarray(images).shape[0]
        if targets.ndim not in (1, 2) or targets.shape[0] != n:
            raise ValueError(f"targets must be [{n}] or [{n}, D], got shape {targets.shape}")
        if not np.isfinite(targets).all():
            raise ValueError("targets must be finite")
        super().__init__(images, np.zeros(n, dtype=np.int64), ["-"], mean, std)
        self.labels = targets
        self.classes = []

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([int(i)])
        return x[0], y[0]

    def subset(self, indices: np.ndarray | Sequence[int]) -> TargetArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TargetArrayDataset(self.images[idx], self.labels[idx], self.mean, self.std)


def rotation_angles(n: int, seed: int = 0, max_angle: float = MAX_ANGLE) -> np.ndarray:
    """float64 [n]: the seeded angles, uniform in [-max_angle, max_angle] degrees."""
    if not max_angle > 0:
        raise ValueError(f"max_angle must be positive, got {max_angle}")
    return np.random.default_rng(seed).uniform(-max_angle, max_angle, size=n)


def rotate_digits(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W]: each image rotated by its angle (degrees, counter-clockwise) about its
    centre, bilinear, with a black (0) background, at the same size."""
    out = np.empty_like(images)
    for i, (img, a) in enumerate(zip(images, angles, strict=True)):
        out[i] = np.asarray(Image.fromarray(img).rotate(float(a), resample=Image.BILINEAR,
                                                        fillcolor=0))
    return out


def rotated_mnist5k(path: str | os.PathLike = "../shared/data/mnist_5k.npz", split: str = "train",
                    *, seed: int = 0, max_angle: float = MAX_ANGLE) -> TargetArrayDataset:
    """The MNIST sample's digits, each rotated by a seeded random angle; the target is the angle
    in degrees (float32 [N]). Splits as `mnist5k`: 'train' 4,000, 'test' 1,000 (the last 100 of
    each digit), 'all' 5,000. Images are scaled to [0, 1] like `mnist5k`."""
    x, y = read_mnist5k(path)
    angles = rotation_angles(len(y), seed, max_angle)
    keep = split_mask(y, split)
    return TargetArrayDataset(rotate_digits(x[keep], angles[keep]), angles[keep].astype(np.float32),
                              (0.0,), (1.0,))
