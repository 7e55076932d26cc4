"""Model and data specs from strings (carprune.specs): built-in and user models (`file.py:fn`,
`module:fn`), torchvision names, weights that do not fit, and the CIFAR archive read with its
classes and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CIFAR

import carprune as cp
from carprune import specs


def test_model_specs(tmp_path, lenet_weights, monkeypatch):
    assert isinstance(specs.build_model("resnet56"), cp.models.ResNetCifar)
    assert specs.build_model("resnet56").depth == 56
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "from carprune.models import lenet5\n"
        "def small(num_classes=10, width=4):\n"
        "    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(width * 26 * 26, num_classes))\n"
        "def lenet():\n    return lenet5()\n"
        "def not_a_model():\n    return 3\n")
    m = specs.build_model(f"{tmp_path / 'mymodels.py'}:small", model_kwargs={"width": 6})
    assert m[0].out_channels == 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    lenet = specs.load_model("mymodels:lenet", lenet_weights)
    ref = torch.load(lenet_weights)
    assert all(torch.equal(v, ref[k]) for k, v in lenet.state_dict().items())
    with pytest.raises(ValueError, match="returned int"):
        specs.build_model("mymodels:not_a_model")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        specs.build_model("mymodels:nope")
    with pytest.raises(ValueError, match="does not match"):
        specs.load_model("resnet20", lenet_weights)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="need torchvision installed"):
            specs.build_model("resnet18")
    else:
        assert isinstance(specs.build_model("resnet18"), torch.nn.Module)


def test_the_cifar_archive_gets_its_classes_and_normalisation(cifar_test):
    ds = specs.load_data(CIFAR, "test")
    assert ds.classes == list(cp.data.CIFAR10_CLASSES)
    assert ds.mean == cifar_test.mean and ds.std == cifar_test.std
    assert np.array_equal(ds.labels, cifar_test.labels) and np.array_equal(ds.images, cifar_test.images)
