"""The data package (carprune.data): every form of data a user passes gives the same images,
labels and class names (batches.py), and the engine scores them identically; the rotated-MNIST
regression set; the readers (the shared CIFAR-10 and MNIST splits, image folders, tar archives,
.npz files) read the same images and name what is broken."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

import carprune as cp
from carprune.data import folder
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


# -- the readers: the shared sets' splits, image folders, tar archives, .npz ----------------------
def test_pretrained_accuracy_and_splits(resnet20, cifar_test, mnist_test):
    data = cifar_test.sample(1000, seed=0)
    x, y = data.batch(slice(None))
    with torch.no_grad():
        acc = (resnet20(x).argmax(1) == y).double().mean().item()
    assert 0.77 < acc < 0.85  # 81.0 % on the whole JPEG test set (shared/data/README)
    train = cp.data.mnist5k(cp_mnist_path(), "train")
    assert len(train) == 4000 and len(mnist_test) == 1000
    assert np.bincount(mnist_test.labels).tolist() == [100] * 10
    a, b = data.split(0.5, seed=1)
    assert len(a) == len(b) == 500


def cp_mnist_path():
    from conftest import MNIST

    return MNIST


def _write_folder(root: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes) -> None:
    for split, (x, y) in arrays.items():
        for i, (img, lab) in enumerate(zip(x, y, strict=True)):
            d = root / split / classes[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.png")


def test_folder_tar_and_npz_read_the_same_images(tmp_path, cifar_test, monkeypatch):
    monkeypatch.setenv("CARPRUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    idx = {s: np.sort(rng.choice(len(cifar_test), 30, replace=False)) for s in ("train", "test")}
    arrays = {s: (cifar_test.images[i], cifar_test.labels[i]) for s, i in idx.items()}
    names = ["c" + n for n in cp.data.CIFAR10_CLASSES]  # not CIFAR's names: no CIFAR defaults
    root = tmp_path / "folder"
    _write_folder(root, arrays, names)
    with tarfile.open(tmp_path / "folder.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="folder")
    order = sorted(names)
    test_x, test_y = arrays["test"]
    # the reader orders by class (sorted names), then by file name
    want = np.lexsort((np.arange(30), [order.index(names[c]) for c in test_y]))
    for src in (root, tmp_path / "folder.tar.gz"):
        with pytest.raises(ValueError, match="holds the splits test, train"):
            folder.load_images(src)
        with pytest.raises(ValueError, match="no split 'val'"):
            folder.load_images(src, "val")
        ds = folder.load_images(src, "test", mean=[0.5], std=[0.25])
        assert ds.classes == order
        assert np.array_equal(ds.images, test_x[want])
        assert [ds.classes[c] for c in ds.labels] == [names[c] for c in test_y[want]]
        x, _ = ds.batch([0])
        assert torch.allclose(x[0], (torch.from_numpy(test_x[want][0]).permute(2, 0, 1) / 255 - 0.5)
                              / 0.25)
        again = folder.load_images(src, "test", mean=[0.5], std=[0.25])  # from the cache
        assert np.array_equal(again.images, ds.images)
    assert len(list((tmp_path / "cache").glob("images-*.npz"))) == 2
    grey = folder.load_images(root, "test", channels=1)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in test_x[want]])
    assert np.array_equal(grey.images[..., 0], pil)
    np.savez(tmp_path / "d.npz", images_test=test_x.transpose(0, 3, 1, 2), labels_test=test_y)
    ds = folder.load_images(tmp_path / "d.npz", "test", mean=[0], std=[1])
    assert np.array_equal(ds.images, test_x) and ds.classes == [str(i) for i in range(int(test_y.max()) + 1)]
    with pytest.raises(ValueError, match="needs arrays x_train"):
        folder.load_images(tmp_path / "d.npz", "train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        folder.load_images(tmp_path / "junk.npz")


def test_broken_or_mixed_size_images_are_named(tmp_path, cifar_test, monkeypatch):
    monkeypatch.setenv("CARPRUNE_CACHE", str(tmp_path / "cache"))
    arrays = {"test": (cifar_test.images[:4], np.array([0, 0, 1, 1]))}
    for case in ("corrupt", "sizes"):
        root = tmp_path / case
        _write_folder(root, arrays, ["a", "b"])
        if case == "corrupt":
            (root / "test" / "b" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            needle = r"image (test/b/00003\.png|\S*corrupt/test/b/00003\.png) cannot be decoded"
        else:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "a" / "00001.png")
            needle = r"images differ in size"
        with tarfile.open(tmp_path / f"{case}.tar", "w") as tar:
            tar.add(root, arcname=case)
        for src in (root, tmp_path / f"{case}.tar"):
            with pytest.raises(ValueError, match=needle):
                folder.load_images(src, "test")
    assert not list((tmp_path / "cache").glob("images-*.npz"))  # nothing cached from a failure
