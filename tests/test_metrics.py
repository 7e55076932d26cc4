"""Metrics beyond top-1: the per-sample functions against their definitions, the fixed-point sums
against order and chunking, target bins, and every built-in metric of the engine against an
independent float64 masked forward on ResNet-20 and on the rotated-MNIST angle regressor
(LayerScores under any metric, and its old files: test_scores.py). The references zero the cut
channel with a forward hook on a module named here by hand and evaluate the metric with plain
torch, image by image."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import carprune as cp
from carprune import metrics
from carprune.metrics import FIXED_POINT_SCALE, bin_grouping, get_metric, to_fixed


# -- per-sample functions --------------------------------------------------------------------------
def test_builtin_per_sample_values_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g) * 4
    y = torch.randint(0, 7, (50,), generator=g)
    got = get_metric("nll").per_sample(logits, y)
    assert got.dtype == torch.float64
    ref = F.cross_entropy(logits.double(), y, reduction="none")
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    out = torch.randn(50, 1, generator=g) * 30
    t = torch.randn(50, generator=g) * 30
    assert torch.allclose(get_metric("mse").per_sample(out, t),
                          (out[:, 0].double() - t.double()) ** 2, atol=1e-9)
    assert torch.allclose(get_metric("mae").per_sample(out, t),
                          (out[:, 0].double() - t.double()).abs(), atol=1e-12)
    # multi-output regression: the mean over the outputs
    o2, t2 = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g)
    assert torch.allclose(get_metric("mse").per_sample(o2, t2),
                          ((o2.double() - t2.double()) ** 2).mean(1))


def test_metric_names_directions_and_errors():
    assert get_metric(None).name == "top1" and get_metric(None, topk=5).topk == 5
    assert get_metric("top5").topk == 5 and get_metric("TOP-3").name == "top3"
    assert get_metric("top1").kind == "accuracy" and get_metric("nll").kind == "error"
    assert get_metric("mse").kind == get_metric("mae").kind == "error"
    assert get_metric("top1").scale == 1 and get_metric("nll").scale == FIXED_POINT_SCALE

    def hinge(out, y):
        return (1 - out.gather(1, y[:, None])[:, 0]).clamp_min(0)

    m = get_metric(hinge)
    assert m.name == "hinge" and not m.higher_is_better and m.task == "any"
    hinge.higher_is_better = True
    assert get_metric(hinge).higher_is_better
    assert metrics.custom(lambda o, t: o[:, 0], higher_is_better=True).name == "custom"
    with pytest.raises(ValueError, match="unknown metric 'rmse'.*nll, mse, mae"):
        get_metric("rmse")
    with pytest.raises(ValueError, match="top-k needs an integer k >= 1"):
        get_metric("top0")
    with pytest.raises(ValueError, match="must return one value per sample"):
        metrics.custom(lambda o, t: o.sum()).per_sample(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="regression targets.*int64 class labels"):
        get_metric("mse").per_sample(torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs integer class labels"):
        get_metric("nll").per_sample(torch.zeros(4, 3), torch.zeros(4))


# -- exact sums -----------------------------------------------------------------------------------
def test_fixed_point_sums_do_not_depend_on_order_or_chunking():
    """Per-sample values summed in chunks of any size, in any order, give the same integer; the
    same values summed in float32 (as a naive implementation would) do not."""
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.lognormal(0.0, 2.0, size=20_000))    # NLL-like: a few large values
    whole = int(to_fixed(v, 1e6, "t").sum())
    naive = set()
    for chunk in (1, 7, 64, 999, 20_000):
        for seed in range(3):
            perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(v)))
            parts = [to_fixed(v[perm[s:s + chunk]], 1e6, "t").sum() for s in range(0, len(v), chunk)]
            assert int(torch.stack(parts).sum()) == whole
            f32 = torch.zeros((), dtype=torch.float32)
            for s in range(0, len(v), chunk):
                f32 = f32 + v[perm[s:s + chunk]].float().sum()
            naive.add(float(f32))
    assert len(naive) > 1, "float32 sums should differ with the order (else this test is vacuous)"
    # the fixed-point mean is the float64 mean up to the 2^-25 rounding of each value
    assert abs(whole / FIXED_POINT_SCALE / len(v) - float(v.mean())) <= 2.0 ** -25


def test_fixed_point_range_and_finiteness_are_checked():
    with pytest.raises(ValueError, match="non-finite"):
        to_fixed(torch.tensor([1.0, float("nan")]), 10.0, "nll")
    with pytest.raises(ValueError, match="magnitude 20.*up to 10.*rescale"):
        to_fixed(torch.tensor([1.0, -20.0]), 10.0, "mse")
    bound = metrics.BoundMetric(get_metric("mse"), bin_grouping(torch.zeros(1), 1), 5000)
    # N * limit * 2^24 stays below 2^61: sums and their differences fit in int64
    assert bound.limit * FIXED_POINT_SCALE * 5000 <= 2 ** 61


# -- groups ---------------------------------------------------------------------------------------
def test_quantile_and_given_bins():
    t = torch.from_numpy(np.random.default_rng(0).uniform(-60, 60, 1000))
    g = bin_grouping(t, 4)
    ids = g.assign(t)
    assert g.size == 4 and torch.bincount(ids).tolist() == [250, 250, 250, 250]
    assert g.edges[0] == float(t.min()) and g.edges[-1] == float(t.max())
    assert g.names[-1].endswith("]") and g.names[0].endswith(")")
    # given edges: [e0, e1), [e1, e2), [e2, e3] with the last one closed
    h = bin_grouping(t, [-60, -10, 0, 60])
    ids = h.assign(torch.tensor([-60.0, -10.0, -0.5, 0.0, 60.0]))
    assert ids.tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="outside the bins"):
        h.assign(torch.tensor([61.0]))
    with pytest.raises(ValueError, match="increasing"):
        bin_grouping(t, [0, 0, 1])
    assert bin_grouping(torch.zeros(5, 3), 1).assign(torch.zeros(5, 3)).tolist() == [0] * 5
    with pytest.raises(ValueError, match="one target value per sample"):
        bin_grouping(torch.zeros(5, 3), 4)


# -- the engine against masked forwards ------------------------------------------------------------
RESNET_CUT = {"layer2.0.conv1": "layer2.0.relu1", "layer3.2.conv1": "layer3.2.relu1",
              "layer1.0.conv2": "layer1.0.bn2"}
ANGLE_CUT = {"conv1": "pool1", "conv2": "pool2", "fc1": "relu3"}


def masked_outputs(model, cut_module, unit, x, batch=100):
    """The whole network's outputs with channel `unit` zeroed after `cut_module` (None: intact)."""
    h = None
    if unit is not None:
        def zero(mod, inp, out):
            out = out.clone()
            out[:, unit] = 0
            return out

        h = dict(model.named_modules())[cut_module].register_forward_hook(zero)
    try:
        with torch.no_grad():
            return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])
    finally:
        if h is not None:
            h.remove()


def reference_sums(model, cut_module, units, x, y, groups, ngroups, value):
    """int64 [n, G] and [G]: the metric per image in float64 (`value(outputs, targets)`),
    rounded to fixed point image by image and added per group in Python integers."""
    def sums(out):
        v = value(out.double(), y)
        acc = [0] * ngroups
        for vi, gi in zip(v.tolist(), groups.tolist(), strict=True):
            acc[gi] += int(round(vi * FIXED_POINT_SCALE))
        return acc

    rows = [sums(masked_outputs(model, cut_module, u, x)) for u in units]
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(sums(masked_outputs(model, cut_module,
                                                                                   None, x)))


def _nll_ref(out, y):
    return torch.tensor([float(-torch.log_softmax(o, 0)[t]) for o, t in zip(out, y, strict=True)],
                        dtype=torch.float64)


def _topk_ref(k):
    def correct(out, y):
        # the label is in the top k when fewer than k classes score higher (ties: lower index first)
        return torch.tensor([float(int((o > o[t]).sum() + (o[:t] == o[t]).sum()) < k)
                             for o, t in zip(out, y, strict=True)], dtype=torch.float64)
    return correct


@pytest.mark.parametrize("metric, layer, filters", [
    ("top1", "layer2.0.conv1", [0, 9, 31]),
    ("top5", "layer3.2.conv1", [0, 17, 63]),
    ("nll", "layer2.0.conv1", [0, 9, 31]),
    ("nll", "layer1.0.conv2", [1, 15]),     # cut before the residual add
])
def test_resnet20_metrics_equal_masked_reference_float64(resnet20, cifar_test, metric, layer, filters):
    data = cifar_test.sample(64, seed=12)
    x, y = data.batch(slice(None))
    model64 = copy.deepcopy(resnet20).double()
    got = cp.score_layer(resnet20, layer, data, filters=filters, metric=metric, dtype=torch.float64,
                         progress=False)
    value = _nll_ref if metric == "nll" else _topk_ref(int(metric[3:]))
    ref, base = reference_sums(model64, RESNET_CUT[layer], filters, x.double(), y, y, 10, value)
    scale = FIXED_POINT_SCALE if metric == "nll" else 1
    if scale == 1:
        ref, base = ref // FIXED_POINT_SCALE, base // FIXED_POINT_SCALE
    assert got.metric == metric and got.scale == scale
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
    assert torch.equal(got.class_totals, torch.bincount(y, minlength=10))
    assert (got.importance != 0).any()   # not vacuous
    if metric == "nll":   # error-like: ablated - base, per image
        assert torch.allclose(got.importance, (ref.sum(1) - base.sum()).double() / scale / 64)


@pytest.fixture(scope="module")
def angle_model():
    from conftest import MNIST

    return cp.models.pretrained_angle_cnn(MNIST)


@pytest.fixture(scope="module")
def angle_test():
    from conftest import MNIST

    return cp.data.rotated_mnist5k(MNIST, "test")


@pytest.mark.parametrize("metric", ["mse", "mae"])
@pytest.mark.parametrize("layer", ["conv2", "fc1"])
def test_regression_metrics_equal_masked_reference_float64(angle_model, angle_test, metric, layer):
    data = angle_test.subset(np.arange(0, 1000, 5))
    x, t = data.batch(slice(None))
    units = [0, 7, 31] if layer == "conv2" else [0, 20, 63]
    got = cp.score_layer(angle_model, layer, data, filters=units, metric=metric, bins=4,
                         dtype=torch.float64, progress=False)
    # four quantile bins of the 200 targets, 50 each
    edges = np.quantile(t.double().numpy(), [0, 0.25, 0.5, 0.75, 1])
    groups = torch.from_numpy(np.clip(np.searchsorted(edges[1:-1], t.double().numpy(), side="right"),
                                      0, 3))
    assert got.grouping == "bin" and got.bin_edges == pytest.approx(edges.tolist())
    assert got.class_totals.tolist() == [50] * 4

    def err(out, tt):
        d = out[:, 0] - tt.double()
        return d * d if metric == "mse" else d.abs()

    ref, base = reference_sums(copy.deepcopy(angle_model).double(), ANGLE_CUT[layer], units,
                               x.double(), t, groups, 4, err)
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
    with torch.no_grad():
        direct = float(err(copy.deepcopy(angle_model).double()(x.double()), t).mean())
    assert got.base_value == pytest.approx(direct, rel=1e-9)
    assert (got.importance != 0).all()   # not vacuous: every removal changes the error


def test_float_metric_sums_do_not_depend_on_chunks_or_threads(resnet20, cifar_test):
    data = cifar_test.sample(80, seed=8)
    kw = {"metric": "nll", "dtype": torch.float64, "progress": False, "filters": list(range(0, 32, 6))}
    first = cp.score_layer(resnet20, "layer2.0.conv1", data, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cp.score_layer(resnet20, "layer2.0.conv1", data, rows=37, **kw)
    finally:
        torch.set_num_threads(threads)
    chunked = cp.score_layer(resnet20, "layer2.0.conv1", data, memory_budget="3MiB", **kw)
    unfused = cp.score_layer(resnet20, "layer2.0.conv1", data, fused=False, rows=80, **kw)
    for other in (one, chunked, unfused):
        assert torch.equal(first.counts, other.counts)
        assert torch.equal(first.base_counts, other.base_counts)
    # float32: the sums are exact, but each image's value carries the tail's float32 rounding,
    # which depends on the batch shape (as with top-1, whose counts it rarely flips): chunkings
    # agree to float32 precision, and with float64
    f32 = [cp.score_layer(resnet20, "layer2.0.conv1", data, **{**kw, "dtype": torch.float32}, **o)
           for o in ({}, {"rows": 37}, {"memory_budget": "3MiB"})]
    for other in f32[1:]:
        assert torch.allclose(f32[0].importance, other.importance, rtol=0, atol=1e-6)
    assert torch.allclose(f32[0].importance, first.importance, rtol=0, atol=1e-5)


def test_user_metric_runs_on_the_tail_outputs(resnet20, cifar_test):
    data = cifar_test.sample(40, seed=1)

    def margin(out, y):   # accuracy-like: the label's logit minus the best other logit
        other = out.clone()
        other.scatter_(1, y[:, None], float("-inf"))
        return out.gather(1, y[:, None])[:, 0] - other.max(1).values

    margin.higher_is_better = True
    got = cp.score_layer(resnet20, "layer3.2.conv1", data, filters=[0, 5], metric=margin,
                         dtype=torch.float64, progress=False)
    x, y = data.batch(slice(None))
    model64 = copy.deepcopy(resnet20).double()
    ref, base = reference_sums(model64, "layer3.2.relu1", [0, 5], x.double(), y, y, 10, margin)
    assert got.metric == "margin" and got.higher_is_better
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
    assert torch.allclose(got.importance, (base.sum() - ref.sum(1)).double() / FIXED_POINT_SCALE / 40)


def test_metric_errors_name_the_problem(resnet20, cifar_test, angle_model, angle_test):
    data = cifar_test.sample(10)
    with pytest.raises(ValueError, match="metric 'mse' compares outputs with regression targets"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, metric="mse")
    with pytest.raises(ValueError, match="metric 'top1' needs integer class labels"):
        cp.score_layer(angle_model, "conv2", angle_test.sample(10), metric="top1")
    with pytest.raises(ValueError, match="bins group regression targets"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, bins=4)


def test_greedy_global_and_interpret_take_the_metric(lenet, mnist_test):
    """The importance under `metric` drives interpretation and global compression too."""
    data = mnist_test.sample(200, seed=2)
    s = cp.score_layer(lenet, "conv2", data, metric="nll", progress=False)
    rep = cp.interpret(lenet, "conv2", data, metric="nll", patches=1, search_images=20, progress=False)
    assert [rep.filter(f).car for f in range(50)] == pytest.approx(s.importance.tolist())
    assert rep.base_accuracy == pytest.approx(s.base_value) and any("'nll'" in n for n in rep.notes)
    top = rep.classes_of(int(s.order()[-1]))
    assert top.top[0].car_c == pytest.approx(float(s.importance_c[s.order()[-1]].max()))
    from carprune.global_mode import compress_global

    g = compress_global(lenet, ["conv1", "conv2"], data, flops_target=0.97, metric="nll",
                        per_round=1)
    first = g.trajectory[0].removed[0]
    s1 = cp.score_layer(lenet, first.unit, data, metric="nll", progress=False)
    assert first.importance == pytest.approx(float(s1.importance[first.channel]))
    assert g.config["metric"] == "nll" and g.base_score_accuracy == pytest.approx(s.base_value)
