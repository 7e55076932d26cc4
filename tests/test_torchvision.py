"""torchvision models (the `--model torchvision:NAME` path of the command line) through carprune.

There are no ImageNet weights or data here: the models are randomly initialised with 10 classes,
their BatchNorm statistics set from CIFAR-10 test images so that predictions vary from image to
image, and they run on 32x32 CIFAR-10 images. The API's float64 counts must equal an independent
reference (a forward hook zeroes the filter's channel, the whole network runs); the command line
must build the same model, load its weights and give the same scores as the API.

Marked `torchvision`: scripts/test.sh runs them in a venv where torchvision matches torch. torchvision
is imported inside the tests, so that a venv without it can still collect (and deselect) them,
and a run that selects them without torchvision fails instead of skipping.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import carprune as cp

pytestmark = pytest.mark.torchvision
ROOT = Path(__file__).resolve().parents[1]


def calibrated(name: str, cifar_test: cp.data.ImageArrayDataset) -> nn.Module:
    """torchvision's `name`, random init (seeded), 10 classes, BatchNorm statistics of 256 images."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one pass gives the batch's statistics
            m.reset_running_stats()
    x, _ = cifar_test.sample(256, seed=1).batch(slice(None))
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def reference_counts(model: nn.Module, zero_after: str, filters, x, y, k: int = 10) -> torch.Tensor:
    """int64 [len(filters), k] correct counts per class, each filter's channel zeroed at the output
    of module `zero_after` (its BatchNorm: the activation that follows maps 0 to 0)."""
    module = dict(model.named_modules())[zero_after]
    counts = torch.zeros(len(filters), k, dtype=torch.int64)
    for row, f in enumerate(filters):
        def zero(mod, inp, out, f=f):
            out = out.clone()
            out[:, f] = 0
            return out

        handle = module.register_forward_hook(zero)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        handle.remove()
        counts[row] = torch.bincount(y[ok], minlength=k)
    return counts


@pytest.mark.parametrize("name, layer, zero_after, filters", [
    # conv -> BN -> ReLU -> conv2: the fused-kernel path (torchvision reuses one ReLU module twice)
    ("resnet18", "layer1.0.conv1", "layer1.0.bn1", [0, 21, 63]),
    # conv2 of a stride-2 block: its BN output meets the downsample shortcut in the residual add
    ("resnet18", "layer2.0.conv2", "layer2.0.bn2", [0, 77, 127]),
    # an inverted-residual expansion conv feeding a depthwise conv through ReLU6
    ("mobilenet_v2", "features.7.conv.0.0", "features.7.conv.1.2", [0, 191]),
])
def test_api_counts_equal_masked_forward_in_float64(cifar_test, name, layer, zero_after, filters):
    model = calibrated(name, cifar_test)
    data = cifar_test.sample(48, seed=7)
    x, y = data.batch(slice(None))
    model64 = copy.deepcopy(model).double()
    ref = reference_counts(model64, zero_after, filters, x.double(), y)
    with torch.no_grad():
        pred = model64(x.double()).argmax(1)
    base = torch.bincount(y[pred == y], minlength=10)
    assert len(pred.unique()) >= 4                         # a model whose predictions vary ...
    assert (ref != base).any()                             # ... and whose filters matter
    got = cp.score_layer(model, layer, data, filters=filters, dtype=torch.float64, progress=False)
    assert got.filters.tolist() == filters
    assert torch.equal(got.counts, ref)
    assert torch.equal(got.base_counts, base)


def carprune_cli(*args: str) -> subprocess.CompletedProcess:
    """The `carprune` console script of this venv (as a user types it), in a subprocess."""
    exe = Path(sys.executable).with_name("carprune")
    assert exe.is_file(), f"no carprune console script beside {sys.executable}: is carprune installed?"
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_layers_lists_the_torchvision_convs():
    import torchvision

    r = carprune_cli("layers", "--model", "torchvision:resnet18", "--num-classes", "10")
    assert r.returncode == 0, r.stderr
    model = torchvision.models.resnet18(num_classes=10)
    convs = [f"{n} {m.out_channels}" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert r.stdout.splitlines() == convs
    assert len(convs) == 20 and convs[-1] == "layer4.1.conv2 512"


def test_cli_score_equals_api(cifar_test, tmp_path):
    from conftest import CIFAR

    model = calibrated("resnet18", cifar_test)
    weights = tmp_path / "resnet18-cifar-random.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "scores"
    r = carprune_cli("score", "--model", "torchvision:resnet18", "--num-classes", "10",
                     "--weights", str(weights), "--data", str(CIFAR), "--split", "test",
                     "--layer", "layer4.0.conv1", "--num-images", "64", "--seed", "3",
                     "--out", str(out), "--progress", "log")
    assert r.returncode == 0, r.stderr
    assert (out / "scores.json").is_file()
    got = cp.LayerScores.load(out / "scores.npz")
    api = cp.score_layer(model, "layer4.0.conv1", cifar_test, num_images=64, seed=3, progress=False)
    assert got.layer == "layer4.0.conv1" and got.num_images == 64 and got.counts.shape == (512, 10)
    assert torch.equal(got.counts, api.counts)
    assert torch.equal(got.base_counts, api.base_counts)
    assert got.classes == list(cp.data.CIFAR10_CLASSES)
    assert api.summary() in r.stdout
