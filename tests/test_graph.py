"""graph: the cut, and the one LayerAnalysis per (model, layer).

Expected chains, consumers and readers are written out by hand from the model definitions. The
FLOPs, parameters and bytes one filter accounts for are checked against `cost.count_cost` run on
the physically pruned network (`surgery.prune_filters`, or surgery written out here by hand for
a depthwise chain). The two removal rules that follow from the op semantics (a depthwise conv
moves the cut; a squeeze-excite gate has no cut) are checked against a float64 reference: the
network with the channel zeroed at the cut (a forward hook) and, for the depthwise chain, the
network pruned by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import carprune as cp
from carprune import graph, surgery, units
from carprune.cost import count_cost

X1 = torch.zeros(1, 3, 32, 32)


def targets(nodes) -> list[str]:
    return [str(n.target) for n in nodes]


def zero_after(model: nn.Module, module: str, channel: int, x: torch.Tensor) -> torch.Tensor:
    """Logits with `channel` of `module`'s output zeroed (a forward hook)."""
    def hook(mod, inp, out):
        out = out.clone()
        out[:, channel] = 0
        return out

    h = dict(model.named_modules())[module].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        h.remove()


def hook_counts(model, module, filters, x, y, k=10) -> torch.Tensor:
    out = torch.zeros(len(filters), k, dtype=torch.int64)
    for row, f in enumerate(filters):
        ok = zero_after(model, module, f, x).argmax(1) == y
        out[row] = torch.bincount(y[ok], minlength=k)
    return out


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded BatchNorm statistics and affine parameters (shifts far from 0: BN(0) != 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


# -- ResNet-20 and LeNet-5: structure written out by hand ----------------------------------------
def test_resnet20_block_conv1(resnet20):
    a = graph.analyze(resnet20, "layer1.0.conv1")
    assert targets(a.chain) == ["layer1.0.bn1", "layer1.0.relu1"] and a.node is a.chain[-1]
    assert [(c.kind, c.module) for c in a.consumers] == [("conv", "layer1.0.conv2")]
    assert a.readers == (graph.Reader("layer1.0.conv2", "conv", 1),)
    assert a.narrow and a.chain_modules == ("layer1.0.bn1", "layer1.0.relu1")
    assert a.fused is not None and a.fused.conv is a.gm.get_submodule("layer1.0.conv2")
    assert a.fused.bn is a.gm.get_submodule("layer1.0.bn2") and not a.fused.relu
    assert str(a.bn_node.target) == "layer1.0.bn1" and not a.first_layer
    assert a.per_filter is None and a.num_filters == 16


def test_resnet20_block_conv2_feeds_the_residual_add(resnet20):
    a = graph.analyze(resnet20, "layer1.0.conv2")
    assert targets(a.chain) == ["layer1.0.bn2"]
    assert [c.kind for c in a.consumers] == ["add"] and a.other_consumers == a.consumers
    assert not a.narrow and a.fused is None
    # the stream carries the channel through identity shortcuts to every later block's conv1;
    # layer2.0's padding shortcut moves channels: not followed
    assert [r.module for r in a.readers] == ["layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"]


def test_resnet20_stem_and_last_conv(resnet20):
    a = graph.analyze(resnet20, "conv1")
    assert targets(a.chain) == ["bn1", "relu"] and a.first_layer
    assert [(c.kind, c.module) for c in a.consumers] == [("conv", "layer1.0.conv1"), ("other", None)]
    assert "layer1.0.shortcut" in a.consumers[1].description
    a = graph.analyze(resnet20, "layer3.2.conv2")
    # through the add, the ReLU, the pool and the flatten: one column per channel of the linear
    assert a.readers == (graph.Reader("linear", "linear", 1),)


def test_lenet_flatten_and_linear_consumers(lenet):
    a = graph.analyze(lenet, "conv2", torch.zeros(1, 1, 28, 28))
    assert targets(a.chain) == ["pool2"]
    assert [(c.kind, c.module, c.block) for c in a.consumers] == [("linear_flat", "fc1", 16)]
    assert a.narrow and a.bn_node is None and a.input_shape == (1, 28, 28)
    a = graph.analyze(lenet, "fc1")
    assert [(c.kind, c.module) for c in a.consumers] == [("linear", "fc2")]
    with pytest.raises(graph.CutError, match="network's output itself"):
        graph.analyze(lenet, "fc2")


def test_analysis_of_checks_the_layer(resnet20):
    a = graph.analyze(resnet20, "layer1.0.conv1")
    assert graph.analysis_of(a) is a and graph.analysis_of(a, "layer1.0.conv1") is a
    with pytest.raises(ValueError, match="analysis is of layer 'layer1.0.conv1', not 'conv1'"):
        graph.analysis_of(a, "conv1")
    with pytest.raises(ValueError, match="example_input must be a batch"):
        graph.analyze(resnet20, "conv1", torch.zeros(32))
    with pytest.raises(ValueError, match=r"an input of shape \(1, 32, 32\) does not fit "
                                         r"ResNetCifar \(RuntimeError: Given groups=1, weight "):
        graph.analyze(resnet20, "conv1", torch.zeros(1, 1, 32, 32))


# -- cost per filter against count_cost of the pruned network ------------------------------------
def _cost_drop(before, after):
    return (before.total_flops - after.total_flops, before.total_params - after.total_params,
            before.total_bytes - after.total_bytes)


# every kind of layer: stem (scatter: it feeds a shortcut), block conv1 (narrow; stride 2 in
# layer2.0), block conv2 (scatter: residual add); LeNet's conv -> conv, conv -> flatten -> linear,
# linear -> linear
@pytest.mark.parametrize("net, shape, layers", [
    ("resnet20", (3, 32, 32), ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                               "layer2.0.conv2", "layer3.2.conv1", "layer3.2.conv2"]),
    ("lenet", (1, 28, 28), ["conv1", "conv2", "fc1"]),
])
def test_per_filter_cost_equals_count_cost_of_pruned_network(request, net, shape, layers):
    model = request.getfixturevalue(net)
    base = count_cost(model, shape)
    forms = set()
    for layer in layers:
        a = graph.analyze(model, layer, torch.zeros(1, *shape))
        forms.add(a.narrow)
        pf = a.per_filter
        for removed in ([0], [0, 3, 7]):
            after = count_cost(surgery.prune_filters(model, layer, removed), shape)
            k = len(removed)
            assert _cost_drop(base, after) == (k * pf.flops, k * pf.params, k * pf.bytes), layer
            assert base.layer(layer).flops - after.layer(layer).flops == k * pf.layer_flops
            assert base.layer(layer).bytes - after.layer(layer).bytes == k * pf.layer_bytes
    assert forms == ({True, False} if net == "resnet20" else {True})


# -- a depthwise conv after the layer: the cut moves past it --------------------------------------
class Inverted(nn.Module):
    """stem -> expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(24, 12, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
        x = self.bn3(self.project(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _prune_inverted_by_hand(model: Inverted, f: int) -> Inverted:
    """Channel f deleted from expand, bn1, the depthwise conv, bn2 and project's input."""
    out = copy.deepcopy(model)
    keep = [i for i in range(24) if i != f]
    with torch.no_grad():
        out.expand = nn.Conv2d(8, 23, 1, bias=False).to(model.expand.weight.dtype)
        out.expand.weight.copy_(model.expand.weight[keep])
        out.dw = nn.Conv2d(23, 23, 3, stride=2, padding=1, groups=23, bias=False).to(
            model.dw.weight.dtype)
        out.dw.weight.copy_(model.dw.weight[keep])
        for name in ("bn1", "bn2"):
            old = getattr(model, name)
            bn = nn.BatchNorm2d(23).to(old.weight.dtype).eval()
            for p in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, p).copy_(getattr(old, p)[keep])
            setattr(out, name, bn)
        out.project = nn.Conv2d(23, 12, 1, bias=False).to(model.project.weight.dtype)
        out.project.weight.copy_(model.project.weight[:, keep])
    return out.eval()


def test_depthwise_conv_moves_the_cut_and_removal_deletes_its_filter(cifar_test):
    model = randomise_bn(Inverted())
    a = graph.analyze(model, "expand", X1)
    assert targets(a.chain) == ["bn1", "act1", "dw", "bn2", "act2"]
    assert [(c.kind, c.module) for c in a.consumers] == [("conv", "project")] and a.narrow
    assert a.fused is not None and a.fused.conv is a.gm.get_submodule("project")
    # cost: expand's filter, the depthwise filter, two BatchNorm channels, project's inputs
    pruned = _prune_inverted_by_hand(model, 5)
    assert _cost_drop(count_cost(model, (3, 32, 32)), count_cost(pruned, (3, 32, 32))) == (
        a.per_filter.flops, a.per_filter.params, a.per_filter.bytes)
    assert a.per_filter.flops == 32 * 32 * 8 + 16 * 16 * 9 + 16 * 16 * 12
    # zeroing at the cut is the removal; zeroing before the depthwise conv is not (BN2(0) != 0)
    x, y = cifar_test.sample(64, seed=3).batch(slice(None))
    m64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        removed = _prune_inverted_by_hand(m64, 5)(x64)
    torch.testing.assert_close(zero_after(m64, "act2", 5, x64), removed, rtol=1e-12, atol=1e-12)
    assert (zero_after(m64, "act1", 5, x64) - removed).abs().max() > 1e-3
    # the engine scores that removal: float64 counts equal the hook at the cut
    filters = [0, 5, 23]
    got = cp.score_layer(model, "expand", (x, y), filters=filters, dtype=torch.float64,
                         progress=False)
    assert torch.equal(got.counts, hook_counts(m64, "act2", filters, x64, y))


# -- products: a squeeze-excite gate has no cut; the path it scales has one ----------------------
class Gated(nn.Module):
    """stem -> main conv -> BN -> ReLU = x;  x * sigmoid(fc2(relu(fc1(avgpool(x)))))  -> project."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.main = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.gate = nn.Sigmoid()
        self.project = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.bn(self.main(F.relu(self.stem(x)))))
        s = self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.project(x * s))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_gate_has_no_cut_and_points_to_units():
    with pytest.raises(graph.CutError, match=r"squeeze-excite.*prunable_units") as e:
        graph.analyze(Gated(), "fc2")
    assert "fc2 -> gate" in str(e.value)


def test_path_times_its_own_gate_is_the_coupled_removal(cifar_test):
    """Zeroing channel i of the main path at its cut zeroes the product's channel i and the
    gate's channel i is read nowhere else: exactly the whole-network unit (main channel i with
    gate channel i) removed, as `units.masked_forward` computes it."""
    model = randomise_bn(Gated())
    a = graph.analyze(model, "main", X1)
    assert targets(a.chain) == ["bn", "act"]
    assert sorted(c.kind for c in a.consumers) == ["mul", "other"] and not a.narrow
    x, y = cifar_test.sample(64, seed=5).batch(slice(None))
    m64, x64 = copy.deepcopy(model).double(), x.double()
    ua = units.prunable_units(m64, x64[:1])
    unit = next(u for u in ua.units if "main" in u.producers)
    assert set(unit.producers) == {"main", "fc2"}
    for f in (0, 9):
        torch.testing.assert_close(zero_after(m64, "act", f, x64),
                                   units.masked_forward(ua, x64, {unit.name: [f]}),
                                   rtol=1e-12, atol=1e-12)
    got = cp.score_layer(model, "main", (x, y), filters=[0, 9, 15], dtype=torch.float64,
                         progress=False)
    assert torch.equal(got.counts, hook_counts(m64, "act", [0, 9, 15], x64, y))


class Products(nn.Module):
    def __init__(self, spelled_swish: bool) -> None:
        super().__init__()
        self.spelled_swish = spelled_swish
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a(x)
        if self.spelled_swish:
            return self.c(a * torch.sigmoid(a)).mean((2, 3))
        return self.c(a * self.b(x)).mean((2, 3))


def test_products_with_and_without_a_defined_removal():
    a = graph.analyze(Products(spelled_swish=True), "a")
    assert a.node is a.conv_node and [c.kind for c in a.consumers] == ["other", "mul"]
    with pytest.raises(graph.CutError, match="no removal defined by its cut alone"):
        graph.analyze(Products(spelled_swish=False), "a")     # two independent branches


# -- torchvision: MobileNetV2 and EfficientNet-B0 (random init, CIFAR statistics) ---------------
@pytest.mark.torchvision
def test_mobilenet_v2_expansion_cut_is_after_the_depthwise_conv(cifar_test):
    from test_torchvision import calibrated

    model = calibrated("mobilenet_v2", cifar_test)
    a = graph.analyze(model, "features.7.conv.0.0", X1)
    assert targets(a.chain) == [f"features.7.conv.{i}.{j}" for i in (0, 1) for j in (0, 1, 2)][1:]
    assert [(c.kind, c.module) for c in a.consumers] == [("conv", "features.7.conv.2")]
    x, y = cifar_test.sample(48, seed=7).batch(slice(None))
    m64, x64 = copy.deepcopy(model).double(), x.double()
    filters = [0, 191]
    ref = hook_counts(m64, "features.7.conv.1.2", filters, x64, y)
    got = cp.score_layer(model, "features.7.conv.0.0", (x, y), filters=filters,
                         dtype=torch.float64, progress=False)
    assert torch.equal(got.counts, ref)
    # the old cut (after the expansion's BN) leaves the depthwise BN shift: different logits
    assert (zero_after(m64, "features.7.conv.0.1", 0, x64)
            - zero_after(m64, "features.7.conv.1.2", 0, x64)).abs().max() > 1e-6


@pytest.mark.torchvision
def test_efficientnet_b0_gate_refused_main_path_scored(cifar_test):
    from test_torchvision import calibrated

    model = calibrated("efficientnet_b0", cifar_test)
    with pytest.raises(graph.CutError, match="prunable_units"):
        cp.score_layer(model, "features.2.0.block.2.fc2", cifar_test, num_images=8, progress=False)
    a = graph.analyze(model, "features.2.0.block.0.0", X1)
    assert str(a.node.target) == "features.2.0.block.1.2"      # past the depthwise conv's SiLU
    assert sorted(c.kind for c in a.consumers) == ["mul", "other"]
    x, y = cifar_test.sample(32, seed=7).batch(slice(None))
    m64, x64 = copy.deepcopy(model).double(), x.double()
    filters = [0, 50, 95]
    got = cp.score_layer(model, "features.2.0.block.0.0", (x, y), filters=filters,
                         dtype=torch.float64, progress=False)
    assert torch.equal(got.counts, hook_counts(m64, "features.2.0.block.1.2", filters, x64, y))
