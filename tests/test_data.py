"""Data access (carprune.data.batches): every form of data a user passes gives the same images,
labels and class names, and the engine scores them identically."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

import carprune as cp
from carprune.data.batches import class_names, load_batch, num_items, pick_indices


@pytest.fixture(scope="module")
def small(mnist_test):
    return mnist_test.sample(120, seed=3)


def _as_pair(ds):
    x, y = ds.batch(np.arange(len(ds)))
    return x, y


def test_every_data_form_reads_the_same_items(small):
    x, y = _as_pair(small)
    idx = np.array([5, 0, 77, 119, 5])
    forms = {
        "tensor pair": (x, y),
        "numpy pair": (x.numpy(), y.numpy()),
        "dataset": TensorDataset(x, y),
        "subset": Subset(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), list(range(120, 240))),
        "loader": DataLoader(small, batch_size=7, shuffle=True),
        "loader, custom collate": DataLoader(
            TensorDataset(x, y), batch_size=16,
            collate_fn=lambda items: (torch.stack([i[0] for i in items]),
                                      torch.tensor([int(i[1]) for i in items]))),
    }
    for name, data in forms.items():
        assert num_items(data) == 120, name
        bx, by = load_batch(data, idx)
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx]), name


def test_scores_equal_for_a_numpy_pair_a_loader_and_the_dataset(lenet, small):
    ref = cp.score_layer(lenet, "conv2", small, progress=False)
    x, y = _as_pair(small)
    for data in ((x.numpy(), y.numpy()), DataLoader(small, batch_size=32, shuffle=True)):
        s = cp.score_layer(lenet, "conv2", data, progress=False)
        assert torch.equal(s.counts, ref.counts) and torch.equal(s.base_counts, ref.base_counts)


def test_class_names_look_through_subsets_concats_and_loaders(cifar_test, resnet20):
    names = list(cifar_test.classes)
    assert names[2] == "bird"
    sub = Subset(cifar_test, list(range(0, 10000, 250)))
    assert class_names(sub, 10) == names
    assert class_names(ConcatDataset([sub, Subset(cifar_test, [3])]), 10) == names
    assert class_names(DataLoader(sub), 10) == names
    assert class_names(TensorDataset(torch.zeros(1)), 10) == [str(i) for i in range(10)]
    given = [f"class {i}" for i in range(10)]
    assert class_names(sub, 10, given) == given
    with pytest.raises(ValueError, match="classes names 3 classes but the model has 10"):
        class_names(sub, 10, ["a", "b", "c"])
    s = cp.score_layer(resnet20, "layer3.2.conv1", sub, progress=False)
    assert s.classes == names
    x, y = load_batch(sub, np.arange(len(sub)))
    s = cp.score_layer(resnet20, "layer3.2.conv1", (x, y), progress=False, classes=given)
    assert s.classes == given


def test_too_many_images_and_train_mode_are_said(small, lenet, caplog):
    with caplog.at_level(logging.WARNING, logger="carprune"):
        idx = pick_indices(120, 500, seed=0)
    assert len(idx) == 120
    assert "num_images=500 but the data holds 120 images: using all 120" in caplog.text
    caplog.clear()
    model = cp.models.lenet5()
    model.load_state_dict(lenet.state_dict())
    model.train()
    with caplog.at_level(logging.WARNING, logger="carprune"):
        s = cp.score_layer(model, "conv1", small, progress=False)
    assert "is in train mode: it is scored in eval mode" in caplog.text
    assert model.training  # the user's model is left as it was
    assert torch.equal(s.counts, cp.score_layer(lenet, "conv1", small, progress=False).counts)


def test_bad_data_is_named():
    with pytest.raises(TypeError, match="a DataLoader, or a pair"):
        num_items(42)
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        num_items((np.zeros((3, 1, 2, 2), np.float32), np.zeros(2, np.int64)))


# -- regression targets: the rotated-MNIST angle task ----------------------------------------------
def test_rotated_mnist_angles_splits_and_images():
    from conftest import MNIST
    from PIL import Image

    from carprune.data.batches import load_targets
    from carprune.data.mnist import read_mnist5k, split_mask

    everything = cp.data.rotated_mnist5k(MNIST, "all")
    test = cp.data.rotated_mnist5k(MNIST, "test")
    assert len(everything) == 5000 and len(test) == 1000
    a = everything.labels
    assert a.dtype == np.float32 and a.min() >= -60 and a.max() <= 60
    assert abs(float(a.mean())) < 2.0 and np.histogram(a, bins=4, range=(-60, 60))[0].min() > 1100
    # digit i has the same angle in every split, from the seed alone
    mask = split_mask(read_mnist5k(MNIST)[1], "test")
    assert np.array_equal(test.labels, a[mask])
    assert not np.array_equal(cp.data.rotated_mnist5k(MNIST, "test", seed=1).labels, test.labels)
    # each image is its digit rotated counter-clockwise by its angle: turning it back by -angle
    # recovers the digit far better than turning it further
    x, _ = read_mnist5k(MNIST)
    i = int(np.flatnonzero(mask)[np.argmax(np.abs(test.labels))])
    j = int(np.flatnonzero(mask).tolist().index(i))
    rot = test.images[j, ..., 0]
    back = np.asarray(Image.fromarray(rot).rotate(-float(a[i]), resample=Image.BILINEAR))
    wrong = np.asarray(Image.fromarray(rot).rotate(float(a[i]), resample=Image.BILINEAR))
    orig = x[i].astype(float)
    assert np.corrcoef(back.ravel(), orig.ravel())[0, 1] > 0.8
    assert np.corrcoef(wrong.ravel(), orig.ravel())[0, 1] < 0.5
    # float targets come through every data form unchanged
    xb, tb = test.batch([3, 1])
    assert tb.dtype == torch.float32 and tb.tolist() == test.labels[[3, 1]].tolist()
    assert load_batch((xb, tb), [1])[1].dtype == torch.float32
    assert torch.equal(load_targets(test, [3, 1]), tb)
    assert isinstance(test.subset([0, 1]), cp.data.TargetArrayDataset)
    assert test[5][1].dtype == torch.float32
    with pytest.raises(ValueError, match="targets must be"):
        cp.data.TargetArrayDataset(test.images[:3], np.zeros(4), (0.0,), (1.0,))


def test_angle_cnn_is_trained():
    from conftest import MNIST

    model = cp.models.pretrained_angle_cnn(MNIST)
    x, t = cp.data.rotated_mnist5k(MNIST, "test").batch(slice(None))
    with torch.no_grad():
        mae = (model(x)[:, 0] - t).abs().mean().item()
    assert mae < 11.0      # 9.5 degrees for the project's model; predicting 0 would give 30
    assert t.abs().mean().item() > 25
