"""Shared fixtures: the real data and pretrained models in ../shared/data (beside the repo).

Where the data is: ``$CARPRUNE_SHARED/data`` when ``CARPRUNE_SHARED`` is set, else ``../shared/data``
beside the repository.

Without it, every test that needs it (through these fixtures or `require`) is skipped, with the
missing path as the reason, and the others (the op tests among them) still run. In CI
(``CI`` set to anything but empty/0/false/no, as CI services and ``.ci/run`` set it) missing data
is an error at session start instead: there a skip would hide a missing set-up step.

carprune itself is imported by the fixtures, not here, so that tests which read only the source
(test_layering, test_readme) run while the package does not import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    import carprune as cp

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ["CARPRUNE_SHARED"]) if os.environ.get("CARPRUNE_SHARED") else ROOT.parent / "shared"
DATA = SHARED / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
MNIST = DATA / "mnist_5k.npz"
RESNET20 = DATA / "models" / "resnet20-12fca82f.th"
RESNET32 = DATA / "models" / "resnet32-d509ac18.th"
SHARED_FILES = (CIFAR, MNIST, RESNET20, RESNET32)


def in_ci() -> bool:
    """Whether this run is CI: ``CI`` is set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(*paths: Path) -> list[Path]:
    """The given shared files (all of `SHARED_FILES` when none are given) that are not there."""
    return [p for p in (paths or SHARED_FILES) if not p.is_file()]


def require(*paths: Path) -> None:
    """Skip the calling test, naming every missing path, unless all `paths` are files."""
    gone = missing(*paths)
    if gone:
        pytest.skip(f"needs the shared data, missing: {', '.join(map(str, gone))} (clone beside "
                    "../shared or set CARPRUNE_SHARED)")


def pytest_configure(config: pytest.Config) -> None:
    gone = missing()
    if gone and in_ci():
        raise pytest.UsageError(
            f"CI={os.environ['CI']!r} and the shared data is missing: {', '.join(map(str, gone))}. "
            "In CI the data tests must run, not skip: put ../shared/data beside the repository or "
            "point CARPRUNE_SHARED at the directory holding data/.")


def pytest_report_header(config: pytest.Config) -> str:
    gone = missing()
    state = "all present" if not gone else f"missing {len(gone)} of {len(SHARED_FILES)} files: the " \
                                           "tests that need them are skipped"
    return f"carprune shared data: {DATA} ({state})"


@pytest.fixture(scope="session")
def cifar_test() -> cp.data.ImageArrayDataset:
    require(CIFAR)
    import carprune as cp

    return cp.data.cifar10(CIFAR, "test")


@pytest.fixture(scope="session")
def resnet20() -> torch.nn.Module:
    require(RESNET20)
    import carprune as cp

    return cp.models.load_checkpoint(cp.models.resnet_cifar(20), RESNET20)


@pytest.fixture(scope="session")
def lenet() -> torch.nn.Module:
    require(MNIST)
    import carprune as cp

    return cp.models.pretrained_lenet5(MNIST)


@pytest.fixture(scope="session")
def lenet_weights(lenet, tmp_path_factory) -> Path:
    """The trained LeNet-5's state dict in a .pt file (test_cli, test_cli_global, test_specs)."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "lenet5.pt"
    torch.save(lenet.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def mnist_test() -> cp.data.ImageArrayDataset:
    require(MNIST)
    import carprune as cp

    return cp.data.mnist5k(MNIST, "test")


def calibrated_torchvision(name: str, cifar_test: cp.data.ImageArrayDataset
                           ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision's `name`, random init (seeded), 10 classes, BatchNorm statistics of 256
    CIFAR-10 images upsampled to 64x64; and 32 other such images with their labels (for the
    tests marked `torchvision`)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    x, _ = cifar_test.sample(256, seed=1).batch(slice(None))
    model.train()
    with torch.no_grad():
        model(F.interpolate(x, size=64, mode="bilinear"))
    x, y = cifar_test.sample(32, seed=7).batch(slice(None))
    return model.eval(), F.interpolate(x, size=64, mode="bilinear"), y
