"""Data-free filter importance criteria against independent numpy computations on the real
weights of the pretrained ResNet-20 and the trained LeNet-5. Consumers are written out by hand.
Criteria are objects (`LayerCriterion`): the built-ins equal their names, and a user's object (a
BatchNorm-scale criterion) ranks greedy compression end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import carprune as cp
from carprune import criteria, graph

# channels of the stem conv1 are read (through identity shortcuts and residual adds) by the first
# conv of every layer1 block and by layer2.0.conv1; layer2.0's shortcut pads channels: not followed
STEM_READERS = ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"]


def weights(model, name: str) -> np.ndarray:
    return dict(model.named_modules())[name].weight.detach().double().numpy()


def conv_kernels(w: np.ndarray) -> list[np.ndarray]:
    """Per input channel c: the consumer's kernels W[:, c] as rows [out, kh * kw]."""
    return [w[:, c].reshape(w.shape[0], -1) for c in range(w.shape[1])]


def linear_kernels(w: np.ndarray, channels: int) -> list[np.ndarray]:
    """Per channel c of a flattened [C, H, W] input: the column block of c in every row."""
    block = w.shape[1] // channels
    return [w[:, c * block:(c + 1) * block] for c in range(channels)]


def np_entropy(kern: np.ndarray, k: int = 5) -> float:
    n = kern.shape[0]
    k = min(k, n - 1)
    dm = np.zeros(n)
    for i in range(n):
        d = np.sqrt(((kern - kern[i]) ** 2).sum(1))
        d = np.delete(d, i)
        dm[i] = np.sort(d)[:k].sum()
    p = dm / dm.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def np_minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def np_kse(consumers: list[list[np.ndarray]]) -> np.ndarray:
    s = sum(np.array([np.abs(kc).sum() for kc in ks]) for ks in consumers)
    e = sum(np.array([np_entropy(kc) for kc in ks]) for ks in consumers)
    return np.sqrt(np_minmax(s) / (1 + np_minmax(e)))


@pytest.mark.parametrize("net, layer", [("resnet20", "layer3.2.conv1"), ("resnet20", "conv1"),
                                        ("lenet", "conv1"), ("lenet", "conv2")])
def test_mean_in_and_l1(request, net, layer):
    model = request.getfixturevalue(net)
    w = weights(model, layer)
    n = w.shape[0]
    ref_mean = np.array([np.abs(w[i]).mean() for i in range(n)])
    ref_l1 = np.array([np.abs(w[i]).sum() for i in range(n)])
    got_mean = criteria.filter_importance(model, layer, "mean_in")
    got_l1 = criteria.filter_importance(model, layer, "l1")
    assert got_mean.shape == (n,) and got_l1.shape == (n,)
    np.testing.assert_allclose(got_mean.numpy(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(got_l1.numpy(), ref_l1, rtol=1e-12)


def test_mean_out(resnet20, lenet):
    # plain chain: the next conv's weights W[:, i]
    w = weights(resnet20, "layer3.2.conv2")
    ref = np.array([np.abs(w[:, i]).mean() for i in range(64)])
    np.testing.assert_allclose(criteria.filter_importance(resnet20, "layer3.2.conv1", "mean_out"), ref,
                               rtol=1e-12)
    # conv -> pool -> flatten -> fc1: 16 columns per channel
    fc1 = weights(lenet, "fc1")
    ref = np.array([np.abs(fc1[:, 16 * i:16 * (i + 1)]).mean() for i in range(50)])
    np.testing.assert_allclose(criteria.filter_importance(lenet, "conv2", "mean_out"), ref, rtol=1e-12)
    # the stem: every conv that reads its channels through the residual stream
    ws = [weights(resnet20, n) for n in STEM_READERS]
    ref = np.array([np.concatenate([np.abs(w[:, i]).ravel() for w in ws]).mean() for i in range(16)])
    np.testing.assert_allclose(criteria.filter_importance(resnet20, "conv1", "mean_out"), ref, rtol=1e-12)
    assert [o.consumer for o in criteria.outgoing_weights(resnet20, "conv1")] == STEM_READERS
    # last block conv2 -> add -> relu -> pool -> flatten -> linear (one column per channel)
    lin = weights(resnet20, "linear")
    np.testing.assert_allclose(criteria.filter_importance(resnet20, "layer3.2.conv2", "mean_out"),
                               np.abs(lin).mean(0), rtol=1e-12)


@pytest.mark.parametrize("net, layer, readers", [
    ("resnet20", "layer3.2.conv1", ["layer3.2.conv2"]),
    ("resnet20", "conv1", STEM_READERS),
    ("lenet", "conv1", ["conv2"]),
    ("lenet", "conv2", ["fc1"]),
])
def test_kse(request, net, layer, readers):
    model = request.getfixturevalue(net)
    channels = dict(model.named_modules())[layer].out_channels
    consumers = []
    for r in readers:
        w = weights(model, r)
        consumers.append(conv_kernels(w) if w.ndim == 4 else linear_kernels(w, channels))
    ref = np_kse(consumers)
    got = criteria.filter_importance(model, layer, "kse")
    assert got.dtype == torch.float64 and got.shape == (channels,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    assert got.min() == 0 and 0 < got.max() <= 1  # the least sparse channel scores 0


def test_kse_entropy_small_and_degenerate_sets():
    rng = np.random.default_rng(0)
    kern = rng.normal(size=(3, 4, 9))                  # 4 kernels per channel: k = 3, not 5
    got = criteria.kernel_entropy(torch.from_numpy(kern))
    np.testing.assert_allclose(got.numpy(), [np_entropy(kern[c], 5) for c in range(3)], rtol=1e-12)
    # identical kernels: every distance is 0, entropy 0; a single kernel: 0
    same = torch.ones(2, 6, 9, dtype=torch.float64)
    assert criteria.kernel_entropy(same).abs().max() == 0
    assert criteria.kernel_entropy(torch.randn(2, 1, 9)).abs().max() == 0
    # equally spaced points on a line: the two ends have the larger kNN distance sums
    line = torch.arange(8, dtype=torch.float64).view(1, 8, 1)
    dm = np.array([sum(sorted(abs(i - j) for j in range(8) if j != i)[:5]) for i in range(8)])
    p = dm / dm.sum()
    assert criteria.kernel_entropy(line).item() == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-12)


def test_random_is_seeded(resnet20):
    a = criteria.filter_importance(resnet20, "layer2.0.conv1", "random", seed=3)
    b = criteria.filter_importance(resnet20, "layer2.0.conv1", "random", seed=3)
    c = criteria.filter_importance(resnet20, "layer2.0.conv1", "random", seed=4)
    assert a.shape == (32,) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 1 and len(set(a.tolist())) == 32


def test_bad_requests(resnet20):
    with pytest.raises(ValueError, match=r"unknown criterion 'l2'.*random, mean_in, mean_out, l1, kse"):
        criteria.filter_importance(resnet20, "conv1", "l2")
    with pytest.raises(graph.CutError, match=r"unknown layer"):
        criteria.filter_importance(resnet20, "conv9", "l1")
    before = resnet20.conv1.weight.clone()
    criteria.filter_importance(resnet20, "conv1", "kse")
    assert torch.equal(before, resnet20.conv1.weight)


def test_linear_neurons(lenet):
    """fc1's neurons: incoming weights are fc1's rows, outgoing ones fc2's columns."""
    w1 = lenet.fc1.weight.detach().double()
    w2 = lenet.fc2.weight.detach().double()
    assert torch.allclose(criteria.filter_importance(lenet, "fc1", "l1"), w1.abs().sum(1))
    assert torch.allclose(criteria.filter_importance(lenet, "fc1", "mean_in"), w1.abs().mean(1))
    assert torch.allclose(criteria.filter_importance(lenet, "fc1", "mean_out"), w2.abs().mean(0))
    assert criteria.filter_importance(lenet, "fc1", "random").shape == (500,)


def test_criteria_take_the_layer_analysis(resnet20, lenet):
    """One `graph.LayerAnalysis` serves every criterion: the same scores as from (model, layer),
    its readers are the consumers written out above, and a mismatched layer is refused."""
    for model, layer, readers in ((resnet20, "conv1", STEM_READERS), (lenet, "conv2", ["fc1"])):
        a = graph.analyze(model, layer)
        assert [r.module for r in a.readers] == readers
        assert [o.consumer for o in criteria.outgoing_weights(a)] == readers
        for crit in ("mean_in", "l1", "mean_out", "kse"):
            assert torch.equal(criteria.filter_importance(a, None, crit),
                               criteria.filter_importance(model, layer, crit))
    with pytest.raises(ValueError, match=r"analysis is of layer 'conv2', not 'conv1'"):
        criteria.filter_importance(a, "conv1", "l1")


# -- criteria as objects (`LayerCriterion`) ------------------------------------------------------
class BNScale:
    """A user criterion: |gamma| of the BatchNorm right after the layer (network slimming)."""

    name = "bn_scale"

    def __init__(self, rescore=False):
        self.rescore = rescore
        self.widths = []          # the filters the layer had at each call

    def __call__(self, analysis):
        bn = analysis.gm.get_submodule(str(analysis.bn_node.target))
        self.widths.append(analysis.conv.weight.shape[0])
        return bn.weight.detach().abs().double()


def test_builtin_objects_are_the_named_criteria(resnet20):
    a = graph.analyze(resnet20, "layer2.0.conv1")
    for name, obj in (("mean_in", criteria.MeanIn()), ("mean_out", criteria.MeanOut()),
                      ("l1", criteria.L1()), ("kse", criteria.KSE())):
        assert obj.name == name and not obj.rescore
        assert isinstance(obj, criteria.LayerCriterion)
        assert type(criteria.get_criterion(name)) is type(obj)
        assert torch.equal(obj(a), criteria.filter_importance(resnet20, "layer2.0.conv1", name))
    assert torch.equal(criteria.Random(3)(a),
                       criteria.filter_importance(resnet20, "layer2.0.conv1", "random", seed=3))
    assert criteria.get_criterion("random", seed=3).name == "random(seed=3)"
    # KSE's parameters reach kse_scores and name the object
    k3 = criteria.KSE(neighbours=3, alpha=0.5)
    assert k3.name == "kse(neighbours=3, alpha=0.5)"
    out = criteria.outgoing_weights(a)
    assert torch.equal(k3(a), criteria.kse_scores(out, alpha=0.5, neighbours=3))
    assert not torch.equal(k3(a), criteria.KSE()(a))


def test_a_user_criterion_ranks_greedy_compression(resnet20, cifar_test):
    """BN-scale objects go through compress_layer: filters leave in the order of |gamma| (ties:
    lower index), ranked once, or re-ranked each step on the pruned network with the same order
    (the BatchNorm keeps the remaining gammas), and the result names the criterion."""
    score = cifar_test.sample(40, seed=0)
    gamma = resnet20.layer1[1].bn1.weight.detach().abs().double()
    expect = sorted(range(16), key=lambda f: (float(gamma[f]), f))[:6]
    once, again = BNScale(), BNScale(rescore=True)
    r1 = cp.compress_layer(resnet20, "layer1.1.conv1", score, criterion=once, keep=10,
                           filters_per_step=2, progress=False)
    r2 = cp.compress_layer(resnet20, "layer1.1.conv1", score, criterion=again, keep=10,
                           progress=False)
    assert r1.removed == r2.removed == expect
    assert [s.removed for s in r1.trajectory[1:]] == [expect[0:2], expect[2:4], expect[4:6]]
    assert [v for s in r2.trajectory[1:] for v in s.scores] == [float(gamma[f]) for f in expect]
    assert once.widths == [16] and again.widths == [16, 15, 14, 13, 12, 11]
    assert r1.criterion == r1.config["criterion"] == "bn_scale"
    # the pruned network is what the trajectory says: its layer lost exactly those filters
    assert r1.model.layer1[1].conv1.out_channels == 10
    # a built-in as an object: the same run, the same config string as its name
    by_name = cp.compress_layer(resnet20, "layer1.1.conv1", score, criterion="l1", keep=14,
                                progress=False)
    by_obj = cp.compress_layer(resnet20, "layer1.1.conv1", score, criterion=criteria.L1(),
                               keep=14, progress=False)
    assert by_name.removed == by_obj.removed and by_name.config == by_obj.config


def test_bad_criterion_objects(resnet20, cifar_test):
    score = cifar_test.sample(8, seed=0)
    for bad in (object(), lambda a: a, len):
        with pytest.raises(TypeError, match=r"criterion must be a name \(random, mean_in, "
                                            r"mean_out, l1, kse\) or a LayerCriterion: an object "
                                            r"with name \(str\), rescore \(bool\) and __call__"):
            cp.compress_layer(resnet20, "layer1.1.conv1", score, criterion=bad, keep=14,
                              progress=False)

    class Short(BNScale):
        def __call__(self, analysis):
            return super().__call__(analysis)[:-1]

    with pytest.raises(ValueError, match=r"criterion 'bn_scale' must return a tensor \[16\] "
                                         r"\(one value per filter of 'layer1.1.conv1'\), got "
                                         r"Tensor \(15,\)"):
        criteria.filter_importance(resnet20, "layer1.1.conv1", Short())
    with pytest.raises(TypeError, match="LayerCriterion"):
        criteria.get_criterion(3)
