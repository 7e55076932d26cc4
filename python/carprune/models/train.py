"""Seeded training of the project's own models on the shared MNIST sample, cached outside the
repository: LeNet-5 (classification) and `AngleCNN` (regression of the rotation angle of
rotated digits, for RAR).

Nobody ships these models trained on these 4,000 digits, so the project trains its own (`fit`,
through the one training loop `training.train`): SGD with momentum, fixed seed, one thread for
reproducibility; about half a minute (LeNet-5) to a minute (AngleCNN) on one core.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..callbacks import Callbacks
from ..data.batches import DataLike
from ..data.cache import cache_dir, source_key
from ..data.mnist import mnist5k
from ..data.regression import MAX_ANGLE, rotated_mnist5k
from ..io import atomic_open
from ..training import Schedule
from ..training import train as run_training
from .anglecnn import ANGLE_CNN_LAYOUT, AngleCNN, angle_cnn
from .checkpoint import load_checkpoint
from .lenet5 import LeNet5, lenet5

TRAIN_SETTINGS = {"epochs": 15, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 5e-4, "seed": 0}
ANGLE_TRAIN_SETTINGS = {"epochs": 30, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                        "weight_decay": 5e-4, "seed": 0}
ANGLE_DATA_SEED = 0


def schedule_of(cfg: dict[str, float]) -> Schedule:
    """The training loop's schedule for a settings dict such as `TRAIN_SETTINGS`: SGD with
    momentum and weight decay under a cosine schedule over `epochs` epochs of shuffled batches,
    every module in train mode."""
    return Schedule(epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]), lr=cfg["lr"],
                    momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                    seed=int(cfg["seed"]), sampling="epochs", lr_schedule="cosine", mode="train")


def fit(make_model: Callable[[], nn.Module], train: DataLike,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cfg: dict[str, float], *,
        callbacks: Callbacks | None = None) -> nn.Module:
    """Seeded training from scratch (`training.train` with `schedule_of(cfg)`) on one thread,
    for reproducibility: torch is seeded with `cfg['seed']` before `make_model` builds the model,
    so its initialisation is seeded too. `callbacks` hear of every epoch. Returns the model in
    eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(int(cfg["seed"]))
        model = make_model()
        run_training(model, train, schedule_of(cfg), loss=loss_fn, callbacks=callbacks,
                     name="train")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def train_lenet5(mnist_path: str | os.PathLike, *, callbacks: Callbacks | None = None,
                 **overrides: float) -> LeNet5:
    """Train LeNet-5 on the 'train' split (4,000 digits) of the MNIST sample, seeded."""
    cfg = {**TRAIN_SETTINGS, **overrides}
    return fit(lenet5, mnist5k(mnist_path, "train"), F.cross_entropy, cfg, callbacks=callbacks)


def _angle_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in units of the largest angle (the model predicts degrees)."""
    return F.mse_loss(out[:, 0] / MAX_ANGLE, target / MAX_ANGLE)


def train_angle_cnn(mnist_path: str | os.PathLike, *, callbacks: Callbacks | None = None,
                    **overrides: float) -> AngleCNN:
    """Train `AngleCNN` to regress the rotation angle of the 'train' split (4,000 digits) of
    `rotated_mnist5k` (angles seeded by `ANGLE_DATA_SEED`), seeded; mean squared error."""
    cfg = {**ANGLE_TRAIN_SETTINGS, **overrides}
    train = rotated_mnist5k(mnist_path, "train", seed=ANGLE_DATA_SEED)
    return fit(angle_cnn, train, _angle_loss, cfg, callbacks=callbacks)


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
                      *, callbacks: Callbacks | None = None) -> LeNet5:
    """LeNet-5 trained by `train_lenet5`, from the cache if trained before (keyed by the data
    file and the training settings), else trained now and cached."""
    mnist_path = Path(mnist_path)
    key = source_key(mnist_path, repr(sorted(TRAIN_SETTINGS.items())))
    return _cached(cache_dir() / f"lenet5-mnist5k-{key}.pt", lenet5,
                   lambda: train_lenet5(mnist_path, callbacks=callbacks))


def pretrained_angle_cnn(mnist_path: str | os.PathLike = "../shared/data/mnist_5k.npz",
                         *, callbacks: Callbacks | None = None) -> AngleCNN:
    """`AngleCNN` trained by `train_angle_cnn`, from the cache if trained before (keyed by the
    data file, the angle seed and range, and the training settings), else trained and cached
    (about a minute on one core)."""
    mnist_path = Path(mnist_path)
    key = source_key(mnist_path, repr(sorted(ANGLE_TRAIN_SETTINGS.items())),
                     f"angles seed {ANGLE_DATA_SEED} max {MAX_ANGLE}", repr(ANGLE_CNN_LAYOUT))
    return _cached(cache_dir() / f"anglecnn-rotmnist5k-{key}.pt", angle_cnn,
                   lambda: train_angle_cnn(mnist_path, callbacks=callbacks))
