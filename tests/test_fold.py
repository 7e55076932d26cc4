"""The engine's private graph rewrites (`carprune.fold`): BatchNorm folding and oneDNN
convolutions with fused ReLU / residual add in channels_last.

Each rewritten graph is compared with the network itself in float64 on real CIFAR-10 images
(the rewrites are float32-only, so the fused graph differs from float64 by float32 rounding
alone), and the engine's counts with the rewrite against its counts without it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import calibrated_torchvision
from torch import fx, nn

import carprune as cp
from carprune import fold, graph
from carprune.fold import PointwiseConv, fold_conv_bn, fuse_conv_pointwise

pytestmark = pytest.mark.skipif(fold._pointwise_op() is None,
                                reason="this torch build has no oneDNN (mkldnn) convolutions")


def _modules(gm: fx.GraphModule, kind: type) -> list[nn.Module]:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


def _rewritten(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(folded graph, folded + fused graph) of `model`, private copies."""
    gm = fold_conv_bn(graph.trace(copy.deepcopy(model)))
    return gm, fuse_conv_pointwise(fx.GraphModule(gm, copy.deepcopy(gm.graph)))


def test_resnet20_fused_graph_equals_the_network_to_float32_rounding(resnet20, cifar_test):
    folded, fused = _rewritten(resnet20)
    convs = _modules(fused, PointwiseConv)
    # every conv is rewritten: the stem and conv1 of each block take their ReLU, conv2 of each
    # block takes the residual add and the ReLU after it; no torch conv, add or ReLU is left
    assert len(convs) == 19 and not _modules(fused, nn.ReLU)
    assert sum(c.add and c.relu for c in convs) == 9
    assert sum(c.relu and not c.add for c in convs) == 10
    # (by name: str() of a function holds its address, whose hex digits can spell "add")
    assert not [n for n in fused.graph.nodes if n.op in ("call_function", "call_method") and
                "add" in getattr(n.target, "__name__", str(n.target))]
    x, _ = cifar_test.batch(slice(0, 96))
    with torch.no_grad():
        ref = copy.deepcopy(resnet20).double()(x.double())
        got, plain = fused(x), folded(x)
    scale = ref.abs().max().item()
    # float32 rounding only (a wrong post-op, e.g. the ReLU before the add, moves logits by O(1))
    assert (got.double() - ref).abs().max().item() < 1e-5 * scale
    assert (got - plain).abs().max().item() < 1e-5 * scale


class _Patterns(nn.Module):
    """conv -> function ReLU; add with the conv as the SECOND operand -> method ReLU; a conv with
    two users; a strided depthwise conv whose add operand is 0-d (broadcast)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = (a + self.c2(a)).relu()                 # add(other, conv), then a method ReLU
        c = self.c3(b)                              # two users: only the conv is rewritten
        d = self.c4(c + self.offset) + c.mean()     # a 0-d operand: the unfused ops at run time
        return torch.flatten(d, 1).sum(1, keepdim=True) + torch.flatten(c, 1)


def test_patterns_fuse_where_exact_and_fall_back_elsewhere(cifar_test):
    torch.manual_seed(0)
    m = _Patterns().eval()
    folded, fused = _rewritten(m)
    kinds = sorted((c.add, c.relu) for c in _modules(fused, PointwiseConv))
    assert kinds == [(False, False), (False, True), (True, False), (True, True)]
    x, _ = cifar_test.batch(slice(0, 16))
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
        got = fused(x)
    assert (got.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


class _Viewed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 30 * 30, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        return self.fc(y.view(y.shape[0], -1))     # a view of a channels_last map would fail


@pytest.mark.parametrize("case", ["view", "float64", "switched off"])
def test_graphs_left_alone(case, monkeypatch, cifar_test):
    m = _Viewed() if case == "view" else _Patterns()
    if case == "float64":
        m = m.double()
    if case == "switched off":
        monkeypatch.setattr(fold, "POINTWISE_FUSION", False)
    _, fused = _rewritten(m.eval())
    assert not _modules(fused, PointwiseConv)
    x, _ = cifar_test.batch(slice(0, 4))
    x = x.double() if case == "float64" else x
    with torch.no_grad():
        assert torch.equal(fused(x), m(x))


def test_engine_counts_with_and_without_the_rewrite(resnet20, cifar_test, monkeypatch):
    """Every unit of a ResNet-20 pruned to odd widths (the shapes of a late greedy round), on
    real images: the engine's tails take the rewrite, and its counts are those of the NCHW
    torch convolutions, up to float32 near-ties (none on these images)."""
    x0 = torch.zeros(1, 3, 32, 32)
    rng = np.random.default_rng(0)
    keep = {"conv1": 15, "layer2.0.conv2": 13, "layer3.0.conv2": 29, "layer1.1.conv1": 7,
            "layer2.0.conv1": 17, "layer3.0.conv1": 47}
    drop = {u.name: sorted(rng.choice(u.num_channels, u.num_channels - keep[u.name],
                                      replace=False).tolist())
            for u in cp.prunable_units(resnet20, x0) if u.name in keep}
    small = cp.prune_units(resnet20, drop, x0)
    data = cifar_test.sample(120, seed=3)
    names = ["conv1", "layer1.1.conv1", "layer2.0.conv2", "layer3.0.conv1"]
    scorer = cp.UnitScorer(small, "conv1", data, progress=False)
    assert scorer.path == "head" or _modules(scorer.split.tail, PointwiseConv)
    fused = cp.score_units(small, data, names)
    monkeypatch.setattr(fold, "POINTWISE_FUSION", False)
    plain = cp.score_units(small, data, names)
    pairs = sum(fused[k].counts.shape[0] for k in names) * 120
    flips = sum(int((fused[k].counts - plain[k].counts).abs().sum()) for k in names)
    assert flips <= 0.001 * pairs
    assert all(torch.equal(fused[k].base_counts, plain[k].base_counts) for k in names)


def test_reordered_weight_follows_in_place_changes(cifar_test):
    """The oneDNN-layout copy of the weight is made once, and again when the weight changes in
    place (a stale copy would keep the old filters); copies of the module re-order their own."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU()).eval()
    _, fused = _rewritten(m)
    (conv,) = _modules(fused, PointwiseConv)
    x, _ = cifar_test.batch(slice(0, 8))
    with torch.no_grad():
        before = fused(x)
        conv.weight[2] = 0                     # in place, as a removal would
        conv.bias[2] = -1.0
        after = fused(x)
        twin = copy.deepcopy(fused)
        ref = torch.relu(nn.functional.conv2d(x.double(), conv.weight.double(),
                                              conv.bias.double(), padding=1))
    assert not torch.equal(before, after)
    assert (after.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert (after[:, 2] == 0).all() and torch.equal(twin(x), after)


@pytest.mark.torchvision
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_torchvision_fused_graphs_and_engine(name, cifar_test, monkeypatch):
    """Residual adds, ReLU6 (not fused: the conv alone is rewritten), depthwise convs,
    concatenation, SiLU and squeeze-excite products all run in channels_last: the rewritten
    network is float32 rounding away from float64 (no worse than the unrewritten float32 graph),
    and the engine's float32 counts for a coupled unit and a filter unit are those without the
    rewrite, up to near-ties (random-init networks: small margins)."""
    model, x, y = calibrated_torchvision(name, cifar_test)
    folded, fused = _rewritten(model)
    assert _modules(fused, PointwiseConv)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        got, plain = fused(x), folded(x)
    err, err_plain = ((v.double() - ref).abs().max().item() for v in (got, plain))
    assert err <= max(4 * err_plain, 1e-5 * ref.abs().max().item())
    an = cp.prunable_units(model, x[:1])
    names = [u.name for u in an.units[:2]]
    scorer = cp.UnitScorer(model, names[0], (x, y), analysis=an, progress=False)
    assert scorer.path == "head" or _modules(scorer.split.tail, PointwiseConv)
    on = cp.score_units(model, (x, y), names, analysis=an)
    monkeypatch.setattr(fold, "POINTWISE_FUSION", False)
    off = cp.score_units(model, (x, y), names, analysis=an)
    for k in names:
        pairs = on[k].counts.shape[0] * len(y)
        assert (on[k].counts - off[k].counts).abs().sum().item() <= 2 * max(1, 0.01 * pairs)
        assert (on[k].base_counts - off[k].base_counts).abs().sum().item() <= 2
