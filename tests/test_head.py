"""The fused residual-network ending (head.py, ops.ablate_conv_head) inside the scoring engine:
which tails it takes, and counts against an independent masked forward (a hook zeroes the
channel, the whole network runs) and against the generic tail path."""

from __future__ import annotations

import copy
import json
import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR, DATA, RESNET20
from torch import nn

import carprune as cp
from carprune.head import find_fused_head


def masked_counts(model, cut_module, filters, x, y, k, removed=(), batch=200):
    """int64 [len(filters) + 1, K]: correct counts per class with nothing (row 0) or each filter's
    channel (and `removed`) zeroed at the output of `cut_module`."""
    module = dict(model.named_modules())[cut_module]
    rows = []
    for f in [None, *filters]:
        zero = list(removed) + ([f] if f is not None else [])

        def hook(mod, inp, out, zero=zero):
            out = out.clone()
            out[:, zero] = 0
            return out

        h = module.register_forward_hook(hook)
        counts = torch.zeros(k, dtype=torch.int64)
        with torch.no_grad():
            for s in range(0, len(y), batch):
                ok = model(x[s:s + batch]).argmax(1) == y[s:s + batch]
                counts += torch.bincount(y[s:s + batch][ok], minlength=k)
        h.remove()
        rows.append(counts)
    return torch.stack(rows)


# -- small networks: the ending spelled in the ways forward() methods spell it ----------------
class Ending(nn.Module):
    """conv1 -> BN -> ReLU (the layer scored) -> conv2 -> BN2 [-> + shortcut] -> ending(style)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv1 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(10, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12, 5)
        self.fc2 = nn.Linear(5, 5)
        self.conv3 = nn.Conv2d(10, 10, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc3 = nn.Linear(10, 5)

    def forward(self, x):
        s = self.style
        x = torch.relu(self.stem(x))
        if s == "cut_residual":    # the scored layer's own output is the shortcut (not taken)
            a = self.relu1(self.bn1(self.conv1(x)))
            return self.fc3(self.flatten(self.pool(self.relu(self.bn3(self.conv3(a)) + a))))
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if s == "resnet":          # module ReLU, AdaptiveAvgPool2d((1, 1)), nn.Flatten
            return self.fc(self.flatten(self.pool(self.relu(out + x))))
        if s == "torchvision":     # out += identity; shared ReLU module; torch.flatten(x, 1)
            out += x
            return self.fc(torch.flatten(self.pool(self.relu(out)), 1))
        if s == "functional":      # shortcut first, F.relu, F.adaptive_avg_pool2d, x.flatten(1)
            h = F.adaptive_avg_pool2d(F.relu(torch.add(x, out)), 1)
            return self.fc(self.drop(h.flatten(1)))
        if s == "mean":            # Tensor.add, .relu(), mean over (2, 3): no flatten
            return self.fc(out.add(x).relu().mean((2, 3)))
        if s == "view":            # mean keepdim, view(size(0), -1)
            h = (out + x).relu().mean([-2, -1], keepdim=True)
            return self.fc(h.view(h.size(0), -1))
        if s == "no_add":          # conv -> BN -> ReLU is the fused consumer, then pool, linear
            return self.fc(self.flatten(self.pool(torch.relu(out))))
        if s == "no_relu":         # residual add straight into the pool
            return self.fc(self.flatten(self.pool(operator.add(out, x))))
        # endings the fused kernel does not take
        if s == "pool2":           # a 2x2 pool: not global
            return self.fc(self.pool2(self.relu(out + x)).mean((2, 3)))
        if s == "max":             # max pool
            return self.fc(F.adaptive_max_pool2d(self.relu(out + x), 1).flatten(1))
        if s == "two_fc":          # a second linear layer
            return self.fc2(self.fc(self.flatten(self.pool(self.relu(out + x)))))
        if s == "scaled":          # an extra op after the pool
            return self.fc(self.flatten(self.pool(self.relu(out + x))) * 2)
        raise AssertionError(s)


def ending(style: str) -> nn.Module:
    torch.manual_seed(1)
    m = Ending(style).double().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


def _data(m):
    x = torch.randn(300, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = m(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some wrong, so a removal can help as well as hurt
    return x, y


@pytest.mark.parametrize("style", ["resnet", "torchvision", "functional", "mean", "view", "no_add",
                                   "no_relu"])
def test_fused_head_taken_and_exact(style):
    m = ending(style)
    x, y = _data(m)
    scorer = cp.LayerScorer(m, "conv1", (x, y), dtype=torch.float64, progress=False)
    assert scorer.path == "head", scorer.describe()
    assert "ablate_conv_head" in scorer.describe()
    assert (scorer.head.residual is None) == (style == "no_add")
    assert scorer.head.relu == (style not in ("no_add", "no_relu"))
    got = scorer.score()
    ref = masked_counts(m, "relu1", range(10), x, y, 5)
    assert torch.equal(got.base_counts, ref[0]) and torch.equal(got.counts, ref[1:])
    generic = cp.LayerScorer(m, "conv1", (x, y), dtype=torch.float64, fused_head=False,
                             progress=False)
    assert generic.path == "fused"
    assert torch.equal(generic.score().counts, got.counts)


@pytest.mark.parametrize("style", ["pool2", "max", "two_fc", "scaled", "cut_residual"])
def test_other_tails_keep_the_generic_path(style):
    m = ending(style)
    x, y = _data(m)
    scorer = cp.LayerScorer(m, "conv1", (x, y), dtype=torch.float64, progress=False)
    assert scorer.head is None and scorer.path == "fused"
    assert find_fused_head(scorer.split) is None
    ref = masked_counts(m, "relu1", range(10), x, y, 5)
    got = scorer.score()
    assert torch.equal(got.base_counts, ref[0]) and torch.equal(got.counts, ref[1:])


def test_plan_names_the_path(resnet20, cifar_test):
    data = cifar_test.sample(20)
    head = cp.LayerScorer(resnet20, "layer3.2.conv1", data, progress=False)
    assert head.path == "head"
    assert ("ablate_conv_head: layer3.2.conv2 -> layer3.2.bn2 -> + layer3_2_shortcut -> "
            "layer3.2.relu2 (ReLU) -> pool (AdaptiveAvgPool2d) -> flatten (Flatten) -> linear "
            "(Linear)") in head.describe()
    # layer3.1.conv1's consumer is followed by another residual block: the generic path
    assert cp.LayerScorer(resnet20, "layer3.1.conv1", data, progress=False).path == "fused"
    assert cp.LayerScorer(resnet20, "layer3.2.conv2", data, progress=False).path == "tail"


def test_cli_score_records_the_plan(tmp_path):
    from carprune import cli

    out = tmp_path / "s"
    assert cli.main(["score", "--model", "resnet20", "--weights", str(RESNET20), "--data",
                     str(CIFAR), "--split", "test", "--out", str(out), "--layer",
                     "layer3.2.conv1", "--num-images", "40", "--progress", "none"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    assert doc["path"] == "head" and "fused kernel ablate_conv_head" in doc["plan"]


# -- the pretrained CIFAR ResNets -----------------------------------------------------------------
def resnet32() -> nn.Module:
    return cp.models.load_checkpoint(cp.models.resnet_cifar(32),
                                     DATA / "models" / "resnet32-d509ac18.th")


@pytest.mark.parametrize("net, layer, cut", [("resnet20", "layer3.2.conv1", "layer3.2.relu1"),
                                             ("resnet32", "layer3.4.conv1", "layer3.4.relu1")])
def test_last_block_exact_in_float64(net, layer, cut, resnet20, cifar_test):
    model = resnet20 if net == "resnet20" else resnet32()
    data = cifar_test.sample(150, seed=8)
    x, y = data.batch(slice(None))
    model64 = copy.deepcopy(model).double()
    filters = [0, 5, 17, 33, 63]
    ref = masked_counts(model64, cut, filters, x.double(), y, 10)
    got = cp.score_layer(model, layer, data, filters=filters, dtype=torch.float64, progress=False)
    assert torch.equal(got.base_counts, ref[0]) and torch.equal(got.counts, ref[1:])


def test_greedy_removals_exact_in_float64(resnet20, cifar_test):
    """remove() updates the cached activation and pre-activation the kernel reads: scores on the
    reduced layer equal the masked network with those channels zeroed too."""
    data = cifar_test.sample(120, seed=4)
    x, y = data.batch(slice(None))
    scorer = cp.LayerScorer(resnet20, "layer3.2.conv1", data, dtype=torch.float64, progress=False)
    assert scorer.path == "head"
    scorer.score()
    removed = [40, 3, 17]
    scorer.remove(removed[:1])
    scorer.score([])
    scorer.remove(removed[1:])
    probe = [0, 18, 63]
    got = scorer.score(probe)
    ref = masked_counts(copy.deepcopy(resnet20).double(), "layer3.2.relu1", probe, x.double(), y,
                        10, removed=removed)
    assert torch.equal(got.base_counts, ref[0]) and torch.equal(got.counts, ref[1:])
    assert got.removed == removed


def test_float32_close_and_invariant_to_chunks_and_threads(resnet20, cifar_test):
    """float32 against the generic path (tests/test_engine.py checks the same layer against the
    masked network), and identical counts for any chunking, kernel call size and thread count."""
    data = cifar_test.sample(300, seed=5)
    first = cp.score_layer(resnet20, "layer3.2.conv1", data, progress=False)
    tail = cp.LayerScorer(resnet20, "layer3.2.conv1", data, fused_head=False, progress=False)
    # each differing count needs at least one (filter, image) pair that flipped
    assert (tail.score().counts - first.counts).abs().sum().item() <= 0.001 * 64 * 300
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = cp.score_layer(resnet20, "layer3.2.conv1", data, progress=False)
    finally:
        torch.set_num_threads(threads)
    # a tiny budget: activations streamed in chunks, small kernel calls
    chunked = cp.LayerScorer(resnet20, "layer3.2.conv1", data, memory_budget="600KiB",
                             progress=False)
    assert not chunked.cache_all and chunked.head_rows < 64 * 300
    for other in (one_thread, chunked.score()):
        assert torch.equal(first.counts, other.counts)
        assert torch.equal(first.base_counts, other.base_counts)
