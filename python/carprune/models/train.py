"""Seeded training of LeNet-5 on the shared MNIST sample, cached outside the repository.

Nobody ships a LeNet-5 trained on these 4,000 digits, so the project trains its own: SGD with
momentum, fixed seed, one thread for reproducibility; about half a minute on one core.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cache import cache_dir, source_key
from ..data.mnist import mnist5k
from ..io import atomic_open
from .checkpoint import load_checkpoint
from .lenet5 import LeNet5, lenet5

TRAIN_SETTINGS = {"epochs": 15, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 5e-4, "seed": 0}


def train_lenet5(mnist_path: str | os.PathLike, *, progress: bool = False, **overrides: float
                 ) -> LeNet5:
    """Train LeNet-5 on the 'train' split (4,000 digits) of the MNIST sample, seeded."""
    cfg = {**TRAIN_SETTINGS, **overrides}
    train = mnist5k(mnist_path, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(int(cfg["seed"]))
        rng = np.random.default_rng(int(cfg["seed"]))
        model = lenet5()
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
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def pretrained_lenet5(mnist_path: str | os.PathLike = "../shared/data/mnist_5k.npz",
                      *, progress: bool = False) -> LeNet5:
    """LeNet-5 trained by `train_lenet5`, from the cache if trained before (keyed by the data
    file and the training settings), else trained now and cached."""
    mnist_path = Path(mnist_path)
    key = source_key(mnist_path, repr(sorted(TRAIN_SETTINGS.items())))
    path = cache_dir() / f"lenet5-mnist5k-{key}.pt"
    if path.is_file():
        try:
            return load_checkpoint(lenet5(), path)
        except ValueError:
            path.unlink(missing_ok=True)  # damaged cache: retrain
    model = train_lenet5(mnist_path, progress=progress)
    with atomic_open(path) as f:
        torch.save(model.state_dict(), f)
    return model
