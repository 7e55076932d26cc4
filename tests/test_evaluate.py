"""The one evaluator (carprune.evaluate): accuracy and per-class counts equal a plain forward
pass of the whole network over real CIFAR-10 images, for every data form and batch size; the
memory-based batch size follows the engine's call rule within its budget."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from carprune.data.batches import pick_indices
from carprune.engine import MAX_CALL_ROWS, TARGET_CALL_BYTES
from carprune.evaluate import (
    DEFAULT_ROWS,
    accuracy,
    batch_rows,
    bytes_per_image,
    class_correct,
    rows_for,
)
from carprune.graph import trace


@pytest.fixture(scope="module")
def images(cifar_test):
    return cifar_test.subset(np.arange(300))


@pytest.fixture(scope="module")
def reference(resnet20, images):
    """Per image: is the float64 network's top-1 prediction the label (one plain forward)."""
    x, y = images.batch(slice(None))
    with torch.no_grad():
        pred = copy.deepcopy(resnet20).double().eval()(x.double()).argmax(1)
    return (pred == y).numpy(), y.numpy()


def test_counts_equal_a_plain_forward_for_every_data_form(resnet20, images, reference):
    ok, y = reference
    x, yt = images.batch(slice(None))
    want_c = np.bincount(y[ok], minlength=10)
    want_t = np.bincount(y, minlength=10)
    forms = {"dataset": images, "tensor pair": (x, yt), "numpy pair": (x.numpy(), yt.numpy()),
             "subset": Subset(TensorDataset(torch.cat([x, x]), torch.cat([yt, yt])),
                              list(range(300, 600))),
             "loader": DataLoader(images, batch_size=7, shuffle=True)}
    model = copy.deepcopy(resnet20).double()    # float64: the same predictions as the reference
    runs = [(name, None) for name in forms] + [("dataset", bs) for bs in (37, 1000)]
    for name, bs in runs:
        c, t = class_correct(model, forms[name], batch_size=bs)
        assert np.array_equal(c, want_c) and np.array_equal(t, want_t), (name, bs)
    assert accuracy(model, images) == ok.mean()


def test_seeded_subset_and_float32_agree_with_the_reference(resnet20, images, reference):
    ok, _ = reference
    idx = pick_indices(300, 120, seed=4)
    model = copy.deepcopy(resnet20).eval()
    a = accuracy(model, images, num_images=120, seed=4, batch_size=50)
    # float32 may flip a near-tie against float64; on these images none flips
    assert a == ok[idx].mean()
    assert not model.training


def test_the_models_modes_come_back_and_events_count_images(resnet20, images):
    events = []

    class Rec:
        def on_event(self, e):
            events.append(e)

        def should_stop(self):
            return False

    model = copy.deepcopy(resnet20).train()
    model.bn1.eval()
    c, t = class_correct(model, images, np.arange(250), batch_size=100, callbacks=Rec())
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training
    assert t.sum() == 250
    assert [(e.algorithm, e.step, e.total, e.data["images"]) for e in events] == \
        [("evaluate", 1, 3, 100), ("evaluate", 2, 3, 200), ("evaluate", 3, 3, 250)]


def test_batch_size_from_memory(resnet20, images):
    x, _ = images.batch(np.arange(1))
    gm = trace(resnet20)
    largest, per = bytes_per_image(gm, x)
    # at least the input and the 16 x 32 x 32 float maps of the first block (several of them)
    assert per > x[0].numel() * 4 + 6 * 16 * 32 * 32 * 4
    assert largest == 16 * 32 * 32 * 4            # the widest map: 16 channels at 32 x 32
    assert rows_for(resnet20, x, per * 10 + 5, 300) == 10       # the budget binds
    # a large budget: the engine's call rule, the largest map near TARGET_CALL_BYTES per batch
    assert rows_for(resnet20, x, "1GiB", 300) == TARGET_CALL_BYTES // largest == 64
    assert rows_for(resnet20, x, "1GiB", 50) == 50              # never more than the images
    assert rows_for(resnet20, x, 1, 300) == 1
    assert batch_rows(100, 10**9, 10**6, 100) == MAX_CALL_ROWS  # the engine's cap
    assert batch_rows(100, 10**9, 10**6, 2**20) == TARGET_CALL_BYTES // 2**20

    class Branchy(nn.Module):            # data-dependent control flow: not traceable
        def forward(self, x):
            return x.flatten(1)[:, :10] if x.sum() > 0 else -x.flatten(1)[:, :10]

    assert rows_for(Branchy(), x, "1GiB", 1000) == DEFAULT_ROWS


def test_bad_input_is_named(resnet20, images):
    with pytest.raises(ValueError, match="no images to evaluate"):
        class_correct(resnet20, images, [])
    with pytest.raises(ValueError, match=r"batch_size must be None or an int >= 1, got 0"):
        class_correct(resnet20, images, batch_size=0)
    x, y = images.batch(np.arange(8))
    with pytest.raises(ValueError, match=r"floating point .* regression"):
        accuracy(resnet20, (x, y.float()))
    with pytest.raises(ValueError, match=r"logits \[batch, classes\], got Tensor \(8, 3, 32, 32\)"):
        accuracy(nn.Identity(), (x, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        accuracy(resnet20, (x, y + 10))
    with pytest.raises(ValueError, match=r"returns 10 outputs, expected num_classes=5"):
        class_correct(resnet20, (x, y), num_classes=5)


# -- metric_value: the one evaluator that knows the metric ---------------------------------------
def reference_metrics(model, x, y):
    """Per image, in float64 from one plain forward: top-1 and top-5 hits and the NLL."""
    with torch.no_grad():
        logits = copy.deepcopy(model).double().eval()(x.double())
    top1 = (logits.argmax(1) == y).double()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).double()
    nll = torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]
    return {"top1": top1.numpy(), "top5": top5.numpy(), "nll": nll.numpy()}


def test_metric_value_equals_a_float64_reference_and_the_engine(resnet20, images):
    from carprune.engine import LayerScorer
    from carprune.evaluate import metric_value

    x, y = images.batch(slice(None))
    ref = reference_metrics(resnet20, x, y)
    idx = pick_indices(300, 120, seed=4)
    model = copy.deepcopy(resnet20).double()
    for name in ("top1", "top5", "nll"):
        # (all images: top-1 as in the tests above, the NLL here; a seeded subset: every metric)
        for n, sel in ((None, slice(None)), (120, idx)) if name == "nll" else ((120, idx),):
            got = metric_value(model, images, metric=name, num_images=n, seed=4, batch_size=64)
            want = ref[name][sel].mean()
            # counts exactly; the NLL in fixed point (each value to 2^-24, so the mean to 2^-25)
            assert got == (want if name != "nll" else pytest.approx(want, abs=2.0**-25)), (name, n)
        # the engine's unablated value on the same seeded subset: the same float
        engine = LayerScorer(model, "layer3.2.conv1", images, num_images=120, seed=4,
                             dtype=torch.float64, metric=name, progress=False)
        assert got == engine.score([]).base_value, name
    # three different measures: top-5 > top-1 (0.97 and 0.75 here), the NLL an error (1.17)
    assert ref["top5"].mean() > ref["top1"].mean() and ref["nll"].mean() > 0.1
    # float32, the model as it is: top-k agree with float64 on these images; top-1 is accuracy
    f32 = copy.deepcopy(resnet20).eval()
    kw = {"num_images": 120, "seed": 4}
    assert metric_value(f32, images, metric="top5", **kw) == ref["top5"][idx].mean()
    assert metric_value(f32, images, **kw) == accuracy(f32, images, **kw) == ref["top1"][idx].mean()
    assert metric_value(f32, images, metric="nll", **kw) == pytest.approx(ref["nll"][idx].mean(),
                                                                          abs=1e-6)


def test_metric_value_bad_arguments_are_named(resnet20, images):
    from carprune.evaluate import metric_value

    x, y = images.batch(np.arange(8))
    with pytest.raises(ValueError, match=r"unknown metric 'accuracy'; built-in metrics: top1"):
        metric_value(resnet20, images, metric="accuracy")
    with pytest.raises(ValueError, match=r"metric must be a name, .* got int"):
        metric_value(resnet20, images, metric=3)
    with pytest.raises(ValueError, match=r"metric 'nll' needs class labels, .*floating point "
                                         r"\(torch.float32, a regression task\)"):
        metric_value(resnet20, (x, y.float()), metric="nll")
    with pytest.raises(ValueError, match=r"bins group regression targets"):
        metric_value(resnet20, (x, y), bins=4)
    with pytest.raises(ValueError, match=r"metric 'mse' compares outputs with regression targets"):
        metric_value(resnet20, (x, y), metric="mse")
