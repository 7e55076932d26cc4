"""Shared fixtures: the real data and pretrained models in ../shared/data (beside the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import carprune as cp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
MNIST = DATA / "mnist_5k.npz"
RESNET20 = DATA / "models" / "resnet20-12fca82f.th"


def pytest_configure(config: pytest.Config) -> None:
    if not CIFAR.is_file():
        raise pytest.UsageError(f"the shared data is missing: {CIFAR} (clone beside ../shared)")


@pytest.fixture(scope="session")
def cifar_test() -> cp.data.ImageArrayDataset:
    return cp.data.cifar10(CIFAR, "test")


@pytest.fixture(scope="session")
def resnet20() -> torch.nn.Module:
    return cp.models.load_checkpoint(cp.models.resnet_cifar(20), RESNET20)


@pytest.fixture(scope="session")
def lenet() -> torch.nn.Module:
    return cp.models.pretrained_lenet5(MNIST)


@pytest.fixture(scope="session")
def mnist_test() -> cp.data.ImageArrayDataset:
    return cp.data.mnist5k(MNIST, "test")
