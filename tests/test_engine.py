"""score_layer against an independent reference: per filter, a forward hook zeroes the channel
at the cut and the whole network runs. The cut modules are written out here by hand, not taken
from carprune.graph."""

from __future__ import annotations

import copy

import pytest
import torch

import carprune as cp

# layer -> the module after which its filters' outputs are consumed
RESNET_CUTS = {
    "conv1": "relu",                       # stem: feeds layer1.0.conv1 and the identity shortcut
    "layer1.0.conv1": "layer1.0.relu1",    # block conv1: feeds conv2 (fused kernel path)
    "layer1.0.conv2": "layer1.0.bn2",      # block conv2: feeds the residual add
    "layer2.0.conv1": "layer2.0.relu1",    # stride-2 block with option-A shortcut
    "layer3.2.conv1": "layer3.2.relu1",
}
LENET_CUTS = {"conv1": "pool1", "conv2": "pool2"}


def reference_counts(model, cut_module, filters, x, y, num_classes, batch=128):
    """int64 [len(filters), K]: correct counts per class with each filter's channel zeroed."""
    module = dict(model.named_modules())[cut_module]
    counts = torch.zeros(len(filters), num_classes, dtype=torch.int64)
    for row, f in enumerate(filters):
        def zero(mod, inp, out, f=f):
            out = out.clone()
            out[:, f] = 0
            return out

        h = module.register_forward_hook(zero)
        with torch.no_grad():
            for s in range(0, len(y), batch):
                pred = model(x[s:s + batch]).argmax(1)
                ok = pred == y[s:s + batch]
                counts[row] += torch.bincount(y[s:s + batch][ok], minlength=num_classes)
        h.remove()
    return counts


def base_counts(model, x, y, k):
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return torch.bincount(y[ok], minlength=k)


# float64 convs run on a slow CPU path: a handful of filters (first, last, a few inside) keeps the
# reference affordable; every filter goes through the same code.
@pytest.mark.parametrize("layer, filters", [
    ("conv1", [0, 1, 9, 15]),
    ("layer1.0.conv1", [0, 6, 15]),
    ("layer1.0.conv2", [0, 1, 15]),
    ("layer2.0.conv1", [0, 13, 31]),
])
def test_resnet20_exact_in_float64(resnet20, cifar_test, layer, filters):
    data = cifar_test.sample(64, seed=11)
    x, y = data.batch(slice(None))
    model64 = copy.deepcopy(resnet20).double()
    ref = reference_counts(model64, RESNET_CUTS[layer], filters, x.double(), y, 10)
    got = cp.score_layer(resnet20, layer, data, filters=filters, dtype=torch.float64,
                         progress=False)
    assert got.filters.tolist() == filters
    assert torch.equal(got.counts, ref)
    assert torch.equal(got.base_counts, base_counts(model64, x.double(), y, 10))
    assert got.class_totals.tolist() == torch.bincount(y, minlength=10).tolist()
    assert got.num_images == 64 and got.layer == layer and got.classes[0] == "airplane"
    # the derived indices follow their definitions
    acc0 = got.base_counts.sum().item() / 64
    assert torch.allclose(got.car, acc0 - ref.sum(1).double() / 64)
    totals = torch.bincount(y, minlength=10).double()
    assert torch.allclose(got.car_c, (got.base_counts - ref).double() / totals)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_lenet5_exact_in_float64(lenet, mnist_test, layer):
    x, y = mnist_test.batch(slice(None))
    model64 = copy.deepcopy(lenet).double()
    n = dict(lenet.named_modules())[layer].out_channels
    ref = reference_counts(model64, LENET_CUTS[layer], range(n), x.double(), y, 10, batch=500)
    got = cp.score_layer(lenet, layer, mnist_test, dtype=torch.float64, progress=False)
    assert torch.equal(got.counts, ref)
    assert got.base_accuracy > 0.9  # the project's trained LeNet-5


@pytest.mark.parametrize("layer", ["layer2.0.conv1", "layer3.2.conv1"])
def test_resnet20_float32_close_to_reference(resnet20, cifar_test, layer):
    data = cifar_test.sample(400, seed=5)
    x, y = data.batch(slice(None))
    n = dict(resnet20.named_modules())[layer].out_channels
    ref = reference_counts(resnet20, RESNET_CUTS[layer], range(n), x, y, 10)
    got = cp.score_layer(resnet20, layer, data, progress=False)
    # each differing count needs at least one (filter, image) pair that flipped
    assert (got.counts - ref).abs().sum().item() <= 0.001 * n * len(y)


def test_counts_do_not_depend_on_batching_or_threads(resnet20, cifar_test):
    data = cifar_test.sample(200, seed=2)
    first = cp.score_layer(resnet20, "layer2.0.conv1", data, progress=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = cp.score_layer(resnet20, "layer2.0.conv1", data, rows=37, progress=False)
    finally:
        torch.set_num_threads(threads)
    # a tiny budget: nothing cached, many chunks, recomputed per pass
    chunked = cp.score_layer(resnet20, "layer2.0.conv1", data, memory_budget="3MiB",
                             progress=False)
    unfused = cp.score_layer(resnet20, "layer2.0.conv1", data, fused=False, rows=200,
                             progress=False)
    for other in (one_thread, chunked, unfused):
        assert torch.equal(first.counts, other.counts)
        assert torch.equal(first.base_counts, other.base_counts)


def test_scorer_memory_plan_follows_budget(resnet20, cifar_test):
    data = cifar_test.sample(200, seed=0)
    big = cp.LayerScorer(resnet20, "layer1.0.conv1", data, progress=False)
    small = cp.LayerScorer(resnet20, "layer1.0.conv1", data, memory_budget="4MiB", progress=False)
    assert big.cache_all and big.chunk_images == 200
    assert not small.cache_all and small.chunk_images < 200


def test_removed_filters_match_reference(resnet20, cifar_test):
    """Scores on a reduced structure: removed filters stay zero, the rest are ablated on top."""
    data = cifar_test.sample(120, seed=4)
    x, y = data.batch(slice(None))
    removed = [3, 17, 40]
    model64 = copy.deepcopy(resnet20).double()
    cut = dict(model64.named_modules())["layer3.2.relu1"]

    def zero_removed(mod, inp, out):
        out = out.clone()
        out[:, removed] = 0
        return out

    probe = [0, 18, 63]
    h = cut.register_forward_hook(zero_removed)
    ref = reference_counts(model64, "layer3.2.relu1", probe, x.double(), y, 10)
    base = base_counts(model64, x.double(), y, 10)
    h.remove()
    scorer = cp.LayerScorer(resnet20, "layer3.2.conv1", data, dtype=torch.float64,
                            progress=False)
    scorer.score()  # caches, so the removal below updates the cache incrementally
    scorer.remove(removed[:1])
    scorer.remove(removed[1:])
    alive = [f for f in range(64) if f not in removed]
    assert scorer.alive == alive
    got = scorer.score(probe)
    assert got.filters.tolist() == probe and got.removed == removed
    assert torch.equal(got.counts, ref)
    assert torch.equal(got.base_counts, base)
    with pytest.raises(ValueError, match="already removed"):
        scorer.remove([17])


def test_num_images_takes_a_seeded_random_subset(resnet20, cifar_test):
    a = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, num_images=100, seed=7,
                       filters=[0, 1], progress=False)
    b = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, num_images=100, seed=7,
                       filters=[0, 1], progress=False)
    assert torch.equal(a.counts, b.counts)
    # the archive is ordered by class: a prefix would be all airplanes
    assert (a.class_totals > 0).sum() == 10


def test_bad_input_errors(resnet20, cifar_test):
    data = cifar_test.sample(20)
    with pytest.raises(cp.CutError, match="unknown layer 'layer9.conv1'.*layer1.0.conv1"):
        cp.score_layer(resnet20, "layer9.conv1", data)
    with pytest.raises(cp.CutError, match="'linear' has no valid cut: its filters' outputs are "
                                          "the network's output"):
        cp.score_layer(resnet20, "linear", data)
    with pytest.raises(cp.CutError, match="'layer1.0.bn1' is a BatchNorm2d, not a Conv2d, Conv1d "
                                          "or Linear layer"):
        cp.score_layer(resnet20, "layer1.0.bn1", data)
    x, y = data.batch(slice(None))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got \[.*, 12\]"):
        cp.score_layer(resnet20, "layer3.2.conv1", (x, y.clone().fill_(12)))
    with pytest.raises(ValueError, match="dataset is empty"):
        cp.score_layer(resnet20, "layer3.2.conv1", (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"images of shape \(1, 32, 32\) do not fit"):
        cp.score_layer(resnet20, "layer3.2.conv1", (x[:, :1], y))
    with pytest.raises(ValueError, match="filters \\[64\\] are out of range"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, filters=[64])
    with pytest.raises(ValueError, match=r"filters \[3\] are listed more than once"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, filters=[3, 1, 3])
    with pytest.raises(ValueError, match="the model has 10 outputs, so every prediction is in "
                                         "the top 10"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, topk=10)
    lenet = cp.models.lenet5()   # 32x32 images reach its linear layers, which expect 28x28 ones
    with pytest.raises(ValueError, match=r"images of shape \(1, 32, 32\) do not fit the model "
                                         r"after 'conv1' \(mat1 and mat2 shapes"):
        cp.score_layer(lenet, "conv1", (x[:, :1], y))
    with pytest.raises(ValueError, match="memory size"):
        cp.score_layer(resnet20, "layer3.2.conv1", data, memory_budget="lots")


def test_layer_without_valid_cut():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 10, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x)).flatten(1)

    # conv -> pool -> flatten: flatten is not channel-wise, so the cut is valid here ...
    d = (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64))
    assert cp.score_layer(Head(), "conv", d, progress=False).counts.shape == (10, 10)

    class Out(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 10, 3)

        def forward(self, x):
            return torch.relu(self.conv(x))

    # ... but a conv whose channels are the network output has none
    with pytest.raises(cp.CutError, match="no valid cut"):
        cp.score_layer(Out(), "conv", d)

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:
                h = -h
            return self.fc(h.mean((2, 3)))

    with pytest.raises(cp.CutError, match="cannot be traced"):
        cp.score_layer(Branchy(), "conv", d)


# -- fully-connected neurons and Conv1d filters as units -------------------------------------------
def test_lenet5_fc1_neurons_exact_in_float64(lenet, mnist_test):
    """Neurons of a Linear layer are units like filters: neuron i removed = feature i zeroed after
    fc1's ReLU (LeNet-5's `relu`), where fc2 reads it."""
    x, y = mnist_test.batch(slice(None))
    model64 = copy.deepcopy(lenet).double()
    neurons = list(range(0, 500, 23)) + [499]
    ref = reference_counts(model64, "relu", neurons, x.double(), y, 10, batch=500)
    got = cp.score_layer(lenet, "fc1", mnist_test, filters=neurons, dtype=torch.float64,
                         progress=False)
    assert got.filters.tolist() == neurons and torch.equal(got.counts, ref)
    assert torch.equal(got.base_counts, base_counts(model64, x.double(), y, 10))
    assert (got.car != 0).any()
    full = cp.LayerScorer(lenet, "fc1", mnist_test, progress=False)
    assert full.num_filters == 500 and full.fused is None


class _Conv1dNet(torch.nn.Module):
    """A 1-D signal classifier: Conv1d -> BatchNorm1d -> ReLU -> MaxPool1d, Conv1d, pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(2, 12, 5, padding=2)
        self.bn1 = torch.nn.BatchNorm1d(12)
        self.relu1 = torch.nn.ReLU()
        self.pool1 = torch.nn.MaxPool1d(2)
        self.conv2 = torch.nn.Conv1d(12, 8, 3)
        self.pool2 = torch.nn.AdaptiveAvgPool1d(4)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool2(self.conv2(x))))


def conv1d_net():
    torch.manual_seed(0)
    m = _Conv1dNet().double().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2)
        m.bn1.weight.uniform_(0.5, 1.5)
    return m


def test_conv1d_filters_exact(tmp_path):
    m = conv1d_net()
    x = torch.randn(300, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5     # some wrong, so removals can help as well as hurt
    for layer, cut in (("conv1", "pool1"), ("conv2", "pool2")):
        n = dict(m.named_modules())[layer].out_channels
        ref = reference_counts(m, cut, range(n), x, y, 5)
        got = cp.score_layer(m, layer, (x, y), dtype=torch.float64, progress=False)
        assert torch.equal(got.counts, ref), layer
        assert (got.car != 0).any()


def test_linear_units_need_batch_features_outputs():
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 6)
            self.fc2 = torch.nn.Linear(6, 3)

        def forward(self, x):                  # x: [batch, tokens, 4]
            return self.fc2(torch.relu(self.fc1(x))).mean(1)

    d = (torch.randn(5, 7, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(cp.CutError, match=r"Linear layer whose output here has shape \(1, 7, 6\)"):
        cp.score_layer(Tokens(), "fc1", d)
