"""opsem: the one op-semantics table, and what registering an op changes for every stage.

`keeps_zero` is checked numerically (each op run on an all-zero input). A user activation
registered with `register_channelwise` must move the cut past it, be scored exactly (float64
counts against a forward hook that zeroes the channel at its output, on CIFAR-10 images) and be
followed by whole-network units; an op that does not keep zero must not be treated as one that
does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import carprune as cp
from carprune import graph, opsem, units


@pytest.fixture
def registry(monkeypatch):
    """The table as it is; registrations made in the test are undone afterwards."""
    monkeypatch.setattr(opsem, "_MODULE_RULES", dict(opsem._MODULE_RULES))
    monkeypatch.setattr(opsem, "_FUNCTION_RULES", dict(opsem._FUNCTION_RULES))
    monkeypatch.setattr(opsem, "_METHOD_RULES", dict(opsem._METHOD_RULES))
    monkeypatch.setattr(opsem, "_LEAVES", set(opsem._LEAVES))
    return opsem


def _single(module: nn.Module) -> tuple[fx.GraphModule, fx.Node]:
    gm = graph.trace(nn.Sequential(module))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    return gm, node


def _bn(c: int = 4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.bias.uniform_(0.5, 1)
    return bn


@pytest.mark.parametrize("module", [
    nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-2, 3), nn.Hardtanh(0.5, 2), nn.LeakyReLU(), nn.SiLU(),
    nn.GELU(), nn.Tanh(), nn.Hardswish(), nn.Sigmoid(), nn.Hardsigmoid(), nn.Softplus(),
    nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Dropout(), nn.PReLU(4), _bn(),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=4),
])
def test_keeps_zero_matches_the_op_on_a_zero_input(module):
    torch.manual_seed(0)
    if isinstance(module, nn.Conv2d):
        with torch.no_grad():
            if module.bias is not None:
                module.bias.uniform_(0.5, 1)
    gm, node = _single(module.eval())
    assert opsem.is_channelwise(gm, node, node.args[0])
    with torch.no_grad():
        zero_out = bool((module(torch.zeros(2, 4, 8, 8)) == 0).all())
    assert opsem.keeps_zero(gm, node) == zero_out


def test_depthwise_and_batchnorm_rules():
    gm, node = _single(nn.Conv2d(4, 4, 3, groups=4, bias=False))
    assert opsem.rule(gm, node).params == "depthwise"
    gm, node = _single(nn.Conv2d(4, 4, 3, groups=2))        # grouped, not depthwise: mixes
    assert opsem.rule(gm, node) is None
    gm, node = _single(_bn())
    assert opsem.rule(gm, node).params == "bn"


def test_register_channelwise_names_bad_arguments(registry):
    with pytest.raises(ValueError, match=r"params must be None, 'bn' or 'prelu', got 'depthwise'"):
        opsem.register_channelwise(nn.Tanh, keeps_zero=True, params="depthwise")
    with pytest.raises(TypeError, match="target must be"):
        opsem.register_channelwise(3, keeps_zero=True)


# -- a user activation ---------------------------------------------------------------------------
def make_net(act_type: type[nn.Module]) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(12)
            self.act = act_type()
            self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.act(self.bn1(self.conv1(x)))
            x = F.relu(self.conv2(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    net = Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.3, 0.3)
        net.bn1.bias.uniform_(-0.5, 0.5)
    return net


def hook_counts(model, module, filters, x, y, k=10):
    out = torch.zeros(len(filters), k, dtype=torch.int64)
    for row, f in enumerate(filters):
        def zero(mod, inp, o, f=f):
            o = o.clone()
            o[:, f] = 0
            return o

        h = dict(model.named_modules())[module].register_forward_hook(zero)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        h.remove()
        out[row] = torch.bincount(y[ok], minlength=k)
    return out


def test_registered_activation_is_channelwise_for_every_stage(registry, cifar_test):
    class Cubic(nn.Module):
        """x for x > 0, x^3 / 10 otherwise: keeps zero; traced, it is ops without channel rules."""

        def forward(self, x):
            return torch.where(x > 0, x, 0.1 * x ** 3)

    net = make_net(Cubic)
    x, y = cifar_test.sample(64, seed=2).batch(slice(None))
    # not registered: torch.fx traces into it; the cut stops at the BatchNorm, units refuse it
    assert graph.find_cut(graph.trace(net), "conv1").chain == ["bn1"]
    with pytest.raises(units.UnitError, match="no channel rule"):
        units.prunable_units(net, x[:1])

    opsem.register_channelwise(Cubic, keeps_zero=True)
    a = graph.analyze(net, "conv1", x[:1])
    assert a.cut.chain == ["bn1", "act"] and [(c.kind, c.module) for c in a.consumers] == [
        ("conv", "conv2")]
    assert a.fused is not None and a.narrow
    # scoring: float64 counts equal the whole network with the channel zeroed after Cubic
    filters = [0, 4, 11]
    got = cp.score_layer(net, "conv1", (x, y), filters=filters, dtype=torch.float64,
                         progress=False)
    n64 = copy.deepcopy(net).double()
    ref = hook_counts(n64, "act", filters, x.double(), y)
    assert torch.equal(got.counts, ref)
    with torch.no_grad():
        assert len(n64(x.double()).argmax(1).unique()) >= 3        # predictions vary ...
    assert (ref != got.base_counts).any()                          # ... and the filters matter
    # whole-network units follow the channel through it
    unit = units.prunable_units(net, x[:1]).unit("conv1")
    assert unit.producers == ("conv1",) and unit.consumers == ("conv2",)
    assert unit.through == ("bn1",) and unit.num_channels == 12


def test_an_op_that_does_not_keep_zero_is_not_taken_for_one(registry, cifar_test):
    # After a flatten, only element-wise ops that keep zero may stand between it and the linear
    # layer for the columns to be removable: ReLU yes; Sigmoid and a registered op that does not
    # keep zero, no.
    class Shift(nn.Module):
        def forward(self, x):
            return x + 1.0

    opsem.register_channelwise(Shift, keeps_zero=False)

    def head(act):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), act, nn.Linear(4 * 30 * 30, 10))

    for act, kind in ((nn.ReLU(), "linear_flat"), (nn.Sigmoid(), "other"), (Shift(), "other")):
        a = graph.analyze(head(act), "0")
        assert [c.kind for c in a.consumers] == [kind], act
        assert a.narrow == (kind == "linear_flat")
    # the cut goes past a Sigmoid: scores are those of zeroing after it (the removal), which
    # differ from zeroing before it (sigmoid(0) = 1/2 still reaches the next conv)
    net = make_net(nn.Sigmoid)
    assert graph.analyze(net, "conv1").cut.chain == ["bn1", "act"]
    x, y = cifar_test.sample(64, seed=4).batch(slice(None))
    n64 = copy.deepcopy(net).double()
    filters = list(range(12))
    got = cp.score_layer(net, "conv1", (x, y), filters=filters, dtype=torch.float64,
                         progress=False)
    assert torch.equal(got.counts, hook_counts(n64, "act", filters, x.double(), y))
    assert not torch.equal(got.counts, hook_counts(n64, "bn1", filters, x.double(), y))
