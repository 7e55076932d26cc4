"""Greedy compression against an independently written greedy loop, checkpoint/resume, the
baselines through the same driver, and the physically smaller model."""

from __future__ import annotations

import copy

import pytest
import torch

import carprune as cp
from carprune import greedy


def masked_accuracy(model, cut_module, zeroed, x, y):
    module = dict(model.named_modules())[cut_module]

    def zero(mod, inp, out):
        out = out.clone()
        out[:, list(zeroed)] = 0
        return out

    h = module.register_forward_hook(zero) if zeroed else None
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    if h is not None:
        h.remove()
    return acc


def reference_greedy(model, cut_module, n_filters, x, y, steps):
    """Algorithm 1 written plainly: re-score every remaining filter by a masked forward."""
    removed = []
    for _ in range(steps):
        alive = [f for f in range(n_filters) if f not in removed]
        accs = {f: masked_accuracy(model, cut_module, removed + [f], x, y) for f in alive}
        removed.append(min(alive, key=lambda f: (-accs[f], f)))
    return removed


@pytest.fixture(scope="module")
def lenet_split(mnist_test):
    return mnist_test.sample(500, seed=0).split(0.5, seed=0)


def test_greedy_car_matches_reference_loop(lenet, lenet_split):
    score, hold = lenet_split
    x, y = score.batch(slice(None))
    m64 = copy.deepcopy(lenet).double()
    ref = reference_greedy(m64, "pool1", 20, x.double(), y, steps=6)
    res = cp.compress_layer(lenet, "conv1", score, eval_data=hold, keep=14, dtype=torch.float64,
                            progress=False)
    assert res.removed == ref
    assert len(res.kept) == 14 and len(res.trajectory) == 7
    xh, yh = hold.batch(slice(None))
    for s in res.trajectory:
        gone = [f for t in res.trajectory[1:s.step + 1] for f in t.removed]
        assert s.kept == 20 - len(gone)
        assert s.score_accuracy == pytest.approx(masked_accuracy(m64, "pool1", gone, x.double(), y))
        assert s.holdout_accuracy == pytest.approx(
            masked_accuracy(m64, "pool1", gone, xh.double(), yh))
    # costs shrink with every removal
    flops = [s.layer_flops for s in res.trajectory]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops)
    assert res.trajectory[-1].layer_bytes == 4 * 25 * 1 * 14
    # the physically pruned model equals the masked one
    with torch.no_grad():
        out = res.model.double()(xh.double())
    pruned_acc = (out.argmax(1) == yh).double().mean().item()
    assert pruned_acc == pytest.approx(res.trajectory[-1].holdout_accuracy)
    assert res.model.conv1.out_channels == 14 and res.model.conv2.in_channels == 14


class _Killed(Exception):
    """Stands for a process killed in the middle of a step."""


def test_resume_after_a_kill_gives_identical_result(tmp_path, lenet, lenet_split):
    score, hold = lenet_split
    kw = dict(eval_data=hold, keep=42, progress=False)
    full = cp.compress_layer(lenet, "conv2", score, **kw)
    calls = {"n": 0}

    class DiesInStepThree(cp.LayerScorer):   # the scorer_factory seam: any LayerScorer
        def score(self, filters=None):
            calls["n"] += 1
            if calls["n"] == 7:  # inside the third step, before its checkpoint
                raise _Killed
            return super().score(filters)

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Killed):
        cp.compress_layer(lenet, "conv2", score, checkpoint=ckpt, scorer_factory=DiesInStepThree,
                          **kw)
    state = cp.io.read_json(ckpt)
    assert 1 <= len(state["trajectory"]) - 1 < 3
    resumed = cp.compress_layer(lenet, "conv2", score, checkpoint=ckpt, **kw)
    assert resumed.removed == full.removed
    accs = [s.score_accuracy for s in full.trajectory]
    assert [s.score_accuracy for s in resumed.trajectory] == accs
    with pytest.raises(ValueError, match="different run"):
        cp.compress_layer(lenet, "conv2", score, checkpoint=ckpt, eval_data=hold,
                          keep=40, progress=False)


def test_baselines_follow_their_ranking(lenet, lenet_split):
    score, hold = lenet_split
    w = lenet.conv2.weight.detach()
    l1 = w.abs().sum((1, 2, 3))
    res = cp.compress_layer(lenet, "conv2", score, eval_data=hold, criterion="l1", keep=40,
                            progress=False)
    expect = sorted(range(50), key=lambda f: (float(l1[f]), f))[:10]
    assert res.removed == expect
    r1 = cp.compress_layer(lenet, "conv2", score, criterion="random", keep=45, seed=3,
                           progress=False)
    r2 = cp.compress_layer(lenet, "conv2", score, criterion="random", keep=45, seed=3,
                           progress=False)
    r3 = cp.compress_layer(lenet, "conv2", score, criterion="random", keep=45, seed=4,
                           progress=False)
    assert r1.removed == r2.removed != r3.removed


def test_max_drop_stops_at_the_floor(lenet, lenet_split):
    score, hold = lenet_split
    res = cp.compress_layer(lenet, "conv1", score, eval_data=hold, max_drop=0.02, progress=False)
    base = res.trajectory[0].holdout_accuracy
    (final,) = [s for s in res.trajectory if s.kept == len(res.kept)]
    assert final.holdout_accuracy >= 0.98 * base
    nxt = [s for s in res.trajectory if s.step == final.step + 1]
    assert not nxt or nxt[0].holdout_accuracy < 0.98 * base or nxt[0].kept == 1
    # the result names that step, and measures it on the hold-out split
    assert res.final_step is final and final.accuracy == final.holdout_accuracy
    assert final.accuracy_on == "hold-out"
    if nxt:
        assert res.trajectory[-1] is nxt[0] and res.final_step is not res.trajectory[-1]
    # without hold-out data, the scoring split is what is measured
    alone = cp.compress_layer(lenet, "conv1", score, keep=18, progress=False)
    assert all(s.accuracy == s.score_accuracy and s.accuracy_on == "scoring"
               for s in alone.trajectory)
    assert alone.final_step is alone.trajectory[-1] and alone.final_step.kept == 18


def test_save_load_rebuilds_the_model(tmp_path, lenet, lenet_split):
    score, hold = lenet_split
    res = cp.compress_layer(lenet, "conv2", score, keep=30, filters_per_step=5, progress=False)
    assert len(res.trajectory) == 5 and all(len(s.removed) == 5 for s in res.trajectory[1:])
    res.save(tmp_path / "r")
    back = cp.CompressionResult.load(tmp_path / "r", cp.models.lenet5())
    assert back.removed == res.removed and back.kept == res.kept
    assert [s.flops for s in back.trajectory] == [s.flops for s in res.trajectory]
    x, _ = hold.batch(slice(0, 50))
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), res.model(x))
    assert back.step_of(res.removed[0]) == 1 and back.step_of(res.kept[0]) is None


def test_lazy_mode_valid_and_errors(lenet, lenet_split):
    score, _ = lenet_split
    lazy = cp.compress_layer(lenet, "conv2", score, keep=44, lazy=True, progress=False)
    assert len(lazy.removed) == 6 and len(set(lazy.removed)) == 6
    with pytest.raises(ValueError, match="unknown criterion 'l2'"):
        cp.compress_layer(lenet, "conv2", score, criterion="l2")
    with pytest.raises(ValueError, match="keep must be between 1 and 50"):
        cp.compress_layer(lenet, "conv2", score, keep=60)
    with pytest.raises(ValueError, match="lazy re-scoring applies to the 'car' criterion"):
        cp.compress_layer(lenet, "conv2", score, criterion="l1", lazy=True)
    assert greedy.CRITERIA[0] == "car"


# -- other metrics and linear layers ---------------------------------------------------------------
def masked_mean(model, cut_module, zeroed, x, value):
    """The mean over the images of value(outputs) with channels `zeroed` zeroed after the cut."""
    module = dict(model.named_modules())[cut_module]

    def zero(mod, inp, out):
        out = out.clone()
        out[:, list(zeroed)] = 0
        return out

    h = module.register_forward_hook(zero) if zeroed else None
    with torch.no_grad():
        v = value(model(x)).double().mean().item()
    if h is not None:
        h.remove()
    return v


def test_greedy_nll_matches_reference_loop(lenet, lenet_split):
    """Greedy by NLL: each step removes the filter whose removal raises the loss least."""
    score, hold = lenet_split
    x, y = score.batch(slice(None))
    m64 = copy.deepcopy(lenet).double()

    def nll(out):
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    removed = []
    for _ in range(3):
        alive = [f for f in range(20) if f not in removed]
        loss = {f: masked_mean(m64, "pool1", removed + [f], x.double(), nll) for f in alive}
        removed.append(min(alive, key=lambda f: (loss[f], f)))
    res = cp.compress_layer(lenet, "conv1", score, eval_data=hold, metric="nll", keep=17,
                            dtype=torch.float64, progress=False)
    assert res.removed == removed and res.metric == "nll" and res.config["metric"] == "nll"
    for s in res.trajectory:
        gone = [f for t in res.trajectory[1:s.step + 1] for f in t.removed]
        assert s.score_accuracy == pytest.approx(masked_mean(m64, "pool1", gone, x.double(), nll),
                                                 abs=1e-6)
    # the scores recorded are the loss increases
    assert res.trajectory[1].scores[0] == pytest.approx(
        masked_mean(m64, "pool1", removed[:1], x.double(), nll) - res.trajectory[0].score_accuracy,
        abs=1e-6)


def test_greedy_car_on_linear_neurons(lenet, lenet_split):
    score, hold = lenet_split
    x, y = score.batch(slice(None))
    m64 = copy.deepcopy(lenet).double()
    # Algorithm 1 on fc1's neurons by hand: the features after fc1's ReLU are computed once, a
    # removed neuron is a zeroed column before fc2
    with torch.no_grad():
        h = m64.relu(m64.fc1(m64.flatten(m64.pool2(m64.conv2(m64.pool1(m64.conv1(x.double())))))))
    ref = []
    for _ in range(2):
        def acc(f):
            z = h.clone()
            z[:, ref + [f]] = 0
            return (m64.fc2(z).argmax(1) == y).double().mean().item()
        alive = [f for f in range(500) if f not in ref]
        accs = {f: acc(f) for f in alive}
        ref.append(min(alive, key=lambda f: (-accs[f], f)))
    res = cp.compress_layer(lenet, "fc1", score, eval_data=hold, keep=498, dtype=torch.float64,
                            progress=False)
    assert res.removed == ref
    assert res.model.fc1.out_features == 498 and res.model.fc2.in_features == 498
    assert res.trajectory[-1].layer_flops == 800 * 498
    xh, yh = hold.batch(slice(None))
    with torch.no_grad():
        acc = (res.model.double()(xh.double()).argmax(1) == yh).double().mean().item()
    assert acc == pytest.approx(res.trajectory[-1].holdout_accuracy)
    from carprune.finetune import layer_groups

    own, nxt = layer_groups(lenet, ["fc1"])
    assert "fc1" in own and nxt == {"fc2"}


def test_greedy_rar_stops_within_the_error_ceiling():
    """Greedy RAR on the angle regressor: max_drop bounds the hold-out error from above."""
    from conftest import MNIST

    model = cp.models.pretrained_angle_cnn(MNIST)
    score, hold = cp.data.rotated_mnist5k(MNIST, "test").sample(400, seed=0).split(0.5, seed=0)
    res = cp.compress_layer(model, "conv2", score, eval_data=hold, metric="mae", max_drop=0.1,
                            progress=False)
    base = res.trajectory[0].holdout_accuracy
    final = res.trajectory[len(res.trajectory) - 1 - (len(res.kept) != res.trajectory[-1].kept)]
    assert final.kept == len(res.kept) and final.holdout_accuracy <= 1.1 * base
    assert res.trajectory[-1].holdout_accuracy > 1.1 * base or res.trajectory[-1].kept == 1
    xh, th = hold.batch(slice(None))
    with torch.no_grad():
        mae = (res.model(xh)[:, 0] - th).abs().double().mean().item()
    assert mae == pytest.approx(final.holdout_accuracy, abs=1e-4)
    # RAR orders by error increase: the first removal raised the scoring error least
    s = cp.score_layer(model, "conv2", score, metric="mae", progress=False)
    assert res.removed[0] == s.least_important()[0]
    with pytest.raises(ValueError, match="fine-tuning trains with cross-entropy"):
        cp.compress_layer(model, "conv2", score, metric="mae", keep=30,
                          finetune=cp.FineTune(train_data=score, iters=1))


# -- each step's cost is analytic and equals count_cost of the physically pruned network ------------
# LeNet: conv -> conv, conv -> flatten -> linear, linear -> linear (narrow); ResNet-20: the stem
# and a block's conv2 (scatter: they feed the residual stream) and block conv1s (narrow)
@pytest.mark.parametrize("net, data, layers, scatter", [
    ("lenet", "mnist_test", ["conv1", "conv2", "fc1"], set()),
    ("resnet20", "cifar_test", ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2",
                                "layer3.2.conv2"], {"conv1", "layer2.0.conv2", "layer3.2.conv2"}),
])
def test_step_costs_equal_count_cost_of_the_pruned_network(request, monkeypatch, net, data, layers,
                                                           scatter):
    model, ds = request.getfixturevalue(net), request.getfixturevalue(data)
    score = ds.sample(32, seed=0)
    shape = tuple(score.batch([0])[0].shape[1:])
    counted, pruned = [], []
    real_count, real_prune = greedy.count_cost, cp.surgery.prune_filters
    monkeypatch.setattr(greedy, "count_cost", lambda *a: counted.append(a) or real_count(*a))
    monkeypatch.setattr(cp.surgery, "prune_filters", lambda *a: pruned.append(a) or real_prune(*a))
    for layer in layers:
        n = cp.graph.num_units(dict(model.named_modules())[layer])
        counted.clear()
        pruned.clear()
        res = cp.compress_layer(model, layer, score, criterion="l1", keep=n - 5, filters_per_step=2,
                                progress=False)
        # one measurement (step 0) and one surgery (the result's model), however many steps
        assert len(res.trajectory) == 4 and len(counted) == 1 and len(pruned) == 1, layer
        assert cp.graph.analyze(model, layer).narrow == (layer not in scatter)
        for i, step in enumerate(res.trajectory):
            removed = [f for s in res.trajectory[1:i + 1] for f in s.removed]
            rep = real_count(real_prune(model, layer, removed) if removed else model, shape)
            assert (step.flops, step.params, step.layer_flops, step.layer_bytes) == (
                rep.total_flops, rep.total_params, rep.layer(layer).flops,
                rep.layer(layer).bytes), (layer, i)
        assert res.trajectory[-1].flops < res.trajectory[0].flops
