"""carprune.models: a checkpoint that does not fit the architecture (missing or extra keys, other
shapes) or is no checkpoint at all is named, and so is a bad CIFAR ResNet depth (the data readers'
errors on bad files are checked in the same test); the project's seeded AngleCNN is trained."""

from __future__ import annotations

import pytest
import torch

import carprune as cp


def test_checkpoint_and_data_errors(tmp_path):
    from conftest import CIFAR, MNIST, RESNET20

    state = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    state["module.extra.weight"] = torch.zeros(1)
    del state["module.linear.bias"]
    torch.save({"state_dict": state}, tmp_path / "bad.th")
    with pytest.raises(ValueError, match="missing from the file: linear.bias.*not in the model: "
                                         "extra.weight"):
        cp.models.load_checkpoint(cp.models.resnet_cifar(20), tmp_path / "bad.th")
    with pytest.raises(ValueError, match="shape mismatch: conv1.weight"):
        cp.models.load_checkpoint(_wider_stem(), RESNET20)
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.th is not a PyTorch checkpoint, or it is corrupt"):
        cp.models.load_checkpoint(cp.models.resnet_cifar(20), tmp_path / "junk.th")
    with pytest.raises(FileNotFoundError, match="CIFAR-10 archive not found"):
        cp.data.cifar10(tmp_path / "none.tar.gz")
    (tmp_path / "trunc.tar.gz").write_bytes(CIFAR.read_bytes()[:200_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        cp.data.cifar10(tmp_path / "trunc.tar.gz", "test")
    (tmp_path / "m.npz").write_bytes(MNIST.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a valid MNIST"):
        cp.data.mnist5k(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="split must be"):
        cp.data.cifar10(CIFAR, "val")
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        cp.models.resnet_cifar(21)


def _wider_stem():
    m = cp.models.resnet_cifar(20)
    m.conv1 = torch.nn.Conv2d(3, 16, 5, padding=2, bias=False)
    return m


def test_angle_cnn_is_trained():
    from conftest import MNIST

    model = cp.models.pretrained_angle_cnn(MNIST)
    x, t = cp.data.rotated_mnist5k(MNIST, "test").batch(slice(None))
    with torch.no_grad():
        mae = (model(x)[:, 0] - t).abs().mean().item()
    assert mae < 11.0      # 9.5 degrees for the project's model; predicting 0 would give 30
    assert t.abs().mean().item() > 25
