"""cost.count_cost: FLOPs, parameters and bytes per layer against the paper's formulas with the
layer sizes of ResNet-20, LeNet-5 and a Conv1d network written out by hand (also after pruning);
and its table of rules by module type: a layer type registered with `register_layer_cost` is
counted as its rule says (checked against the built-in rule of the nn.Conv2d it computes the same
as), subclasses inherit a rule, and bad registrations are named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carprune import cost, surgery
from carprune.cost import CostReport, LayerCost, count_cost, layer_cost_rule, register_layer_cost


class PlainConv(nn.Module):
    """A 3x3 conv written by hand (not an nn.Conv2d): count_cost does not know it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


class PlainConvChild(PlainConv):
    pass


def plain_conv_cost(name: str, mod: PlainConv, out: torch.Tensor) -> LayerCost:
    n, c, fh, fw = mod.weight.shape
    ho, wo = out.shape[-2:]
    return LayerCost(name, "plain", (ho, wo), n, (fh, fw), c, ho * wo * n * c * fh * fw,
                     mod.weight.numel(), 4 * mod.weight.numel())


def net(conv: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.fixture()
def rules():
    saved = dict(cost._RULES)
    yield
    cost._RULES.clear()
    cost._RULES.update(saved)


def test_a_registered_layer_counts_as_the_conv_it_computes(rules):
    plain = PlainConv(3, 8)
    ref = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    before = count_cost(net(plain), (3, 6, 6))
    assert [lay.name for lay in before.layers] == ["3"]       # unknown type: not counted
    register_layer_cost(PlainConv, plain_conv_cost)
    got, want = count_cost(net(plain), (3, 6, 6)), count_cost(net(ref), (3, 6, 6))
    assert [(lay.name, lay.flops, lay.params, lay.bytes, lay.out_size, lay.kernel) for lay in got.layers] \
        == [(lay.name, lay.flops, lay.params, lay.bytes, lay.out_size, lay.kernel) for lay in want.layers]
    assert got.layers[0].kind == "plain" and got.total_flops == want.total_flops
    # a subclass inherits the rule; a rule of its own wins
    assert layer_cost_rule(PlainConvChild(3, 8)) is plain_conv_cost
    own = lambda name, mod, out: plain_conv_cost(name, mod, out)  # noqa: E731
    register_layer_cost(PlainConvChild, own)
    assert layer_cost_rule(PlainConvChild(3, 8)) is own and layer_cost_rule(plain) is plain_conv_cost


def test_builtin_rules_and_the_kse_layer_registered_where_it_is_defined():
    assert layer_cost_rule(nn.Conv2d(1, 1, 1)) is cost._conv2d_cost
    assert layer_cost_rule(nn.Linear(1, 1)) is cost._linear_cost
    assert layer_cost_rule(nn.ReLU()) is None
    from carprune.kse import KSEConv2d, kse_layer_cost

    assert cost._RULES[KSEConv2d] is kse_layer_cost


def test_bad_registrations_are_named():
    with pytest.raises(TypeError, match="module_type must be an nn.Module subclass, got <class 'int'>"):
        register_layer_cost(int, plain_conv_cost)
    with pytest.raises(TypeError, match="rule must be callable"):
        register_layer_cost(PlainConv, "flops")


# -- count_cost against the paper's formulas, layer sizes written out by hand ---------------------
def resnet20_conv_table() -> dict[str, tuple[int, int, int]]:
    """conv -> (k output side, n_L filters, n_{L-1} inputs), from the architecture description."""
    t = {"conv1": (32, 16, 3)}
    for stage, (k, width, prev) in enumerate(((32, 16, 16), (16, 32, 16), (8, 64, 32)), start=1):
        for b in range(3):
            t[f"layer{stage}.{b}.conv1"] = (k, width, prev if b == 0 else width)
            t[f"layer{stage}.{b}.conv2"] = (k, width, width)
    return t


def test_count_cost_resnet20(resnet20):
    rep = count_cost(resnet20, (3, 32, 32))
    assert isinstance(rep, CostReport)
    table = resnet20_conv_table()
    for name, (k, n_l, n_in) in table.items():
        lay = rep.layer(name)
        assert (lay.k, lay.filters, lay.f, lay.inputs) == (k, n_l, 3, n_in)
        assert lay.flops == k * k * n_l * 9 * n_in
        assert lay.bytes == 4 * 9 * n_in * n_l
        assert lay.params == 9 * n_in * n_l
    assert rep.layer("linear").flops == 640 and rep.layer("linear").params == 650
    assert rep.total_flops == sum(k * k * n * 9 * m for k, n, m in table.values()) + 640 == 40_551_040
    assert rep.total_params == 269_722  # ResNet-20's published 0.27M parameters
    assert [lay.name for lay in rep.layers] == [*table, "linear"]
    json.dumps(rep.to_dict())
    md = rep.to_markdown()
    assert "| layer3.2.conv2 | 8 | 64 | 3 | 64 | 2,359,296 |" in md
    with pytest.raises(KeyError, match="no conv or linear layer 'layer9'"):
        rep.layer("layer9")
    with pytest.raises(ValueError, match="input_shape"):
        count_cost(resnet20, (3, 0, 32))
    with pytest.raises(ValueError, match="does not fit"):
        count_cost(resnet20, (1, 32, 32))


def test_count_cost_lenet_and_pruned(lenet, resnet20):
    rep = count_cost(lenet, (1, 28, 28))
    assert rep.layer("conv1").flops == 24 * 24 * 20 * 25 * 1
    assert rep.layer("conv2").flops == 8 * 8 * 50 * 25 * 20
    assert rep.layer("conv2").bytes == 4 * 25 * 20 * 50
    assert rep.layer("fc1").flops == 800 * 500 and rep.layer("fc2").flops == 5000
    assert rep.total_flops == 288_000 + 1_600_000 + 400_000 + 5_000
    assert rep.total_params == 520 + 25_050 + 400_500 + 5_010
    p = surgery.prune_filters(lenet, "conv2", list(range(10)))
    rp = count_cost(p, (1, 28, 28))
    assert rp.layer("conv2").flops == 8 * 8 * 40 * 25 * 20 and rp.layer("conv2").filters == 40
    assert rp.layer("fc1").flops == 640 * 500
    assert rp.total_params == rep.total_params - 10 * (25 * 20 + 1) - 10 * 16 * 500
    # scattered: only the kept filters count; the consumers keep their width
    s = count_cost(surgery.prune_filters(resnet20, "layer1.0.conv2", [0, 1, 2]), (3, 32, 32))
    assert s.layer("layer1.0.conv2").filters == 13
    assert s.layer("layer1.0.conv2").flops == 32 * 32 * 13 * 9 * 16
    assert s.layer("layer1.1.conv1").inputs == 16


def test_count_cost_conv1d():
    from test_engine import conv1d_net

    rep = count_cost(conv1d_net(), (2, 32))
    # conv1: 32 outputs x 12 filters x 5 taps x 2 inputs; conv2: 14 outputs x 8 x 3 x 12
    assert rep.layer("conv1").flops == 32 * 12 * 5 * 2 and rep.layer("conv1").kernel == (1, 5)
    assert rep.layer("conv2").flops == 14 * 8 * 3 * 12 and rep.layer("conv2").out_size == (1, 14)
    assert rep.layer("fc").flops == 32 * 5
