"""Seeded training of the project's own models on the shared MNIST sample, cached outside the
repository: LeNet-5 (classification) and `AngleCNN` (regression of the rotation angle of
rotated digits, for RAR).

Nobody ships these models trained on these 4,000 digits, so the project trains its own with one
loop (`fit`): SGD with momentum, fixed seed, one thread for reproducibility; about half a minute
(LeNet-5) to a minute (AngleCNN) on one core.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.arrays import ImageArrayDataset
from ..data.cache import cache_dir, source_key
from ..data.mnist import mnist5k
from ..data.regression import MAX_ANGLE, rotated_mnist5k
from ..io import atomic_open
from .anglecnn import ANGLE_CNN_LAYOUT, AngleCNN, angle_cnn
from .checkpoint import load_checkpoint
from .lenet5 import LeNet5, lenet5

TRAIN_SETTINGS = {"epochs": 15, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 5e-4, "seed": 0}
ANGLE_TRAIN_SETTINGS = {"epochs": 30, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                        "weight_decay": 5e-4, "seed": 0}
ANGLE_DATA_SEED = 0


def fit(make_model: Callable[[], nn.Module], train: ImageArrayDataset,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cfg: dict[str, float], *,
        progress: bool = False) -> nn.Module:
    """The project's one training loop: seeded (torch and numpy, `cfg['seed']`), one thread, SGD
    with momentum and weight decay under a cosine schedule over `cfg['epochs']` epochs of
    shuffled batches of `train` (held in memory). The model is built by `make_model` after
    seeding, so its initialisation is seeded too. Returns it in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(int(cfg["seed"]))
        rng = np.random.default_rng(int(cfg["seed"]))
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
        epochs = int(cfg["epochs"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        x_all, y_all = train.batch(np.arange(len(train)))
        model.train()
        for epoch in range(epochs):
            perm = torch.from_numpy(rng.permutation(len(train)))
            for s in range(0, len(perm), int(cfg["batch_size"])):
                idx = perm[s:s + int(cfg["batch_size"])]
                loss = loss_fn(model(x_all[idx]), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def train_lenet5(mnist_path: str | os.PathLike, *, progress: bool = False, **overrides: float
                 ) -> LeNet5:
    """Train LeNet-5 on the 'train' split (4,000 digits) of the MNIST sample, seeded."""
    cfg = {**TRAIN_SETTINGS, **overrides}
    return fit(lenet5, mnist5k(mnist_path, "train"), F.cross_entropy, cfg, progress=progress)


def _angle_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in units of the largest angle (the model predicts degrees)."""
    return F.mse_loss(out[:, 0] / MAX_ANGLE, target / MAX_ANGLE)


def train_angle_cnn(mnist_path: str | os.PathLike, *, progress: bool = False, **overrides: float
                    ) -> AngleCNN:
    """Train `AngleCNN` to regress the rotation angle of the 'train' split (4,000 digits) of
    `rotated_mnist5k` (angles seeded by `ANGLE_DATA_SEED`), seeded; mean squared error."""
    cfg = {**ANGLE_TRAIN_SETTINGS, **overrides}
    train = rotated_mnist5k(mnist_path, "train", seed=ANGLE_DATA_SEED)
    return fit(angle_cnn, train, _angle_loss, cfg, progress=progress)


def _cached(path: Path, build: Callable[[], nn.Module], train: Callable[[], nn.Module]) -> nn.Module:
    """The model cached at `path` (a state dict loaded into `build()`), else `train()` and cache."""
    if path.is_file():
        try:
            return load_checkpoint(build(), path)
        except ValueError:
            path.unlink(missing_ok=True)  # damaged cache: retrain
    model = train()
    with atomic_open(path) as f:
        torch.save(model.state_dict(), f)
    return model


def pretrained_lenet5(mnist_path: str | os.PathLike = "../shared/data/mnist_5k.npz",
                      *, progress: bool = False) -> LeNet5:
    """LeNet-5 trained by `train_lenet5`, from the cache if trained before (keyed by the data
    file and the training settings), else trained now and cached."""
    mnist_path = Path(mnist_path)
    key = source_key(mnist_path, repr(sorted(TRAIN_SETTINGS.items())))
    return _cached(cache_dir() / f"lenet5-mnist5k-{key}.pt", lenet5,
                   lambda: train_lenet5(mnist_path, progress=progress))


def pretrained_angle_cnn(mnist_path: str | os.PathLike = "../shared/data/mnist_5k.npz",
                         *, progress: bool = False) -> AngleCNN:
    """`AngleCNN` trained by `train_angle_cnn`, from the cache if trained before (keyed by the
    data file, the angle seed and range, and the training settings), else trained and cached
    (about a minute on one core)."""
    mnist_path = Path(mnist_path)
    key = source_key(mnist_path, repr(sorted(ANGLE_TRAIN_SETTINGS.items())),
                     f"angles seed {ANGLE_DATA_SEED} max {MAX_ANGLE}", repr(ANGLE_CNN_LAYOUT))
    return _cached(cache_dir() / f"anglecnn-rotmnist5k-{key}.pt", angle_cnn,
                   lambda: train_angle_cnn(mnist_path, progress=progress))
