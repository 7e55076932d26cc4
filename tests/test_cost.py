"""cost.count_cost's table of rules by module type: a layer type registered with
`register_layer_cost` is counted as its rule says (checked against the built-in rule of the
nn.Conv2d it computes the same as), subclasses inherit a rule, and bad registrations are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carprune import cost
from carprune.cost import LayerCost, count_cost, layer_cost_rule, register_layer_cost


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
