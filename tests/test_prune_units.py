"""Surgery of whole-network units (`surgery.prune_units`) against the float64 masked reference.

The reference is `units.masked_forward`: the unpruned traced network with the removed channels
zeroed in every tensor a consumer reads. It is checked itself against a forward hook written
here by hand for a plain filter. Costs are checked against `cost.count_cost` run on the pruned
model (forward hooks) and the analysis' own prediction (`UnitAnalysis.cost`, `total_params`).

Models: the pretrained CIFAR ResNet-20 of ../shared/data on CIFAR-10 test images; torchvision
resnet18, vgg11_bn, mobilenet_v2, densenet121 and efficientnet_b0 (random init, BatchNorm
statistics of 8 CIFAR-10 test images upsampled to 64 x 64; marked `torchvision`).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import carprune as cp
from carprune import opsem, surgery, units
from carprune.cost import count_cost

ATOL = 1e-9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small float64 forwards: one thread is much faster than two contending ones on a loaded
    machine (measured 0.06 s against 4.7 s for a mobilenet_v2 forward, load 9 on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resnet64(resnet20):
    return copy.deepcopy(resnet20).double().eval()


@pytest.fixture(scope="module")
def cifar_x(cifar_test):
    x, _ = cifar_test.sample(32, seed=5).batch(slice(None))
    return x.double()


@pytest.fixture(scope="module")
def analysis(resnet64, cifar_x):
    return units.prunable_units(resnet64, cifar_x[:1])


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def onnx_run(model: nn.Module, example: torch.Tensor, x: torch.Tensor, path) -> tuple:
    """`model` exported by torch.onnx.export's default exporter (traced on `example`) to
    `path`, checked by onnx's checker, then run on `x` by onnx's reference evaluator: (the
    loaded ONNX model, its output as a tensor)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.onnx.export(model, (example,), str(path), dynamo=True)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    out = ReferenceEvaluator(m).run(None, {m.graph.input[0].name: x.numpy()})[0]
    return m, torch.from_numpy(out)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def touched_layers(analysis, removed) -> set[str]:
    """Every conv / linear module that loses inputs or outputs with `removed`."""
    modules = dict(analysis.gm.named_modules())
    out = set()
    for name in removed:
        for use in analysis.unit(name).uses:
            if isinstance(modules[use.module], nn.Conv2d | nn.Linear):
                out.add(use.module)
    return out


def check_cost(model, pruned, analysis, removed, shape):
    """FLOPs and params of the pruned model as the analysis predicts; FLOPs fall in every
    touched conv / linear layer and nowhere else."""
    before, after = count_cost(model, shape), count_cost(pruned, shape)
    assert after.total_flops == analysis.cost(removed)[0]
    assert after.total_params == analysis.total_params(removed)
    assert after.total_params == sum(p.numel() for p in pruned.parameters())
    touched = touched_layers(analysis, removed)
    assert touched
    for lay in before.layers:
        new = after.layer(lay.name).flops
        if lay.name in touched:
            assert new < lay.flops, lay.name
        else:
            assert new == lay.flops, lay.name
    return before, after


# -- ResNet-20 (pretrained, real images) --------------------------------------------------------
def test_reference_equals_hand_written_mask(resnet64, analysis, cifar_x):
    """masked_forward of a plain filter unit = a forward hook zeroing the channel after its ReLU."""
    removed = {"layer2.1.conv1": [0, 7, 31]}
    handle = resnet64.layer2[1].relu1.register_forward_hook(
        lambda mod, inp, out: out.index_fill(1, torch.tensor([0, 7, 31]), 0))
    try:
        ref = run(resnet64, cifar_x)
    finally:
        handle.remove()
    assert (units.masked_forward(analysis, cifar_x, removed) - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("removed", [
    {"conv1": [0, 5, 15]},                          # the stem stream: every block of all stages
    {"layer2.0.conv2": [0, 3, 8, 15]},              # stage-2 stream channels the pad shortcut zeroes
    {"layer3.0.conv2": [1, 31]},
    {"layer1.0.conv1": [2, 3, 14]},                 # a filter unit
    {"conv1": [1, 2], "layer2.0.conv2": [0, 9], "layer3.0.conv2": [30], "layer2.1.conv1": [4],
     "layer3.2.conv1": [0, 63]},                    # several together
], ids=["stem", "stage2-pad", "stage3-pad", "filter", "together"])
def test_resnet20_pruned_equals_masked(resnet64, analysis, cifar_x, removed):
    before = snapshot(resnet64)
    pruned = surgery.prune_units(resnet64, removed, analysis=analysis)
    ref = units.masked_forward(analysis, cifar_x, removed)
    got = run(pruned, cifar_x)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max().item() < ATOL
    assert (run(resnet64, cifar_x) - ref).abs().max().item() > 1e-3   # the removal matters
    # the given model is untouched
    after = resnet64.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hasattr(m, surgery.LINEAGE_ATTR) for m in resnet64.modules())
    # every producer lost the channels physically; every BN (statistics too) shrank with them
    def lost(module, role):
        return sum(len(i) for n, i in removed.items() if module in getattr(analysis.unit(n), role))

    for name in removed:
        unit = analysis.unit(name)
        for p in unit.producers:
            assert pruned.get_submodule(p).out_channels == \
                resnet64.get_submodule(p).out_channels - lost(p, "producers")
        for t in unit.through:
            bn = pruned.get_submodule(t)
            n = resnet64.get_submodule(t).num_features - lost(t, "through")
            assert bn.num_features == n and bn.running_var.shape == bn.weight.shape == (n,)
    check_cost(resnet64, pruned, analysis, removed, (3, 32, 32))


def test_stem_unit_flops_really_fall(resnet64, analysis):
    """The stem stream feeds residual adds: per-layer surgery scatters it (FLOPs barely fall),
    unit surgery removes the channel everywhere."""
    full = count_cost(resnet64, (3, 32, 32)).total_flops
    scattered = count_cost(surgery.prune_filters(resnet64, "conv1", [0, 5, 15]), (3, 32, 32))
    unit = count_cost(surgery.prune_units(resnet64, {"conv1": [0, 5, 15]}, analysis=analysis),
                      (3, 32, 32))
    assert full - scattered.total_flops == 3 * 32 * 32 * 27             # conv1's own filters only
    assert full - unit.total_flops == 3 * analysis.unit("conv1").flops_per_channel
    assert (full - unit.total_flops) > 50 * (full - scattered.total_flops)


def test_example_input_instead_of_analysis(resnet64, analysis, cifar_x):
    a = surgery.prune_units(resnet64, {"layer3.0.conv2": [4]}, cifar_x[:1])
    b = surgery.prune_units(resnet64, {"layer3.0.conv2": [4]}, analysis=analysis)
    assert torch.equal(run(a, cifar_x), run(b, cifar_x))


def test_prune_twice_composes(resnet64, analysis, cifar_x):
    once = surgery.prune_units(resnet64, {"conv1": [0, 5], "layer3.2.conv1": [3, 7]},
                               analysis=analysis)
    a1 = units.prunable_units(once, cifar_x[:1])
    assert a1.unit("conv1").num_channels == 14
    # current indices 0 and 3 of the stem are original channels 1 and 4; 5 of layer3.2.conv1 is 6
    twice = surgery.prune_units(once, {"conv1": [0, 3], "layer3.2.conv1": [5]}, analysis=a1)
    union = {"conv1": [0, 1, 4, 5], "layer3.2.conv1": [3, 6, 7]}
    ref = units.masked_forward(analysis, cifar_x, union)
    assert (run(twice, cifar_x) - ref).abs().max().item() < ATOL
    assert count_cost(twice, (3, 32, 32)).total_flops == analysis.cost(union)[0]
    kept = surgery.kept_channels(twice)
    assert kept["conv1"] == [i for i in range(16) if i not in (0, 1, 4, 5)]
    assert kept["layer3.2.conv1"] == [i for i in range(64) if i not in (3, 6, 7)]
    # the stage-3 stream channels fed by the stem through both pad shortcuts went too
    assert kept["layer3.0.conv2"] == [i for i in range(64) if i not in (24, 25, 28, 29)]
    lin = getattr(twice.linear, surgery.LINEAGE_ATTR)
    assert lin["inputs"] == kept["layer3.0.conv2"] and lin["in_width"] == 64


def test_units_after_per_layer_scatter(resnet64, cifar_x, tmp_path):
    """prune_units on a model with a ScatteredConv2d (prune_filters' per-layer form) in the
    stream: its zero and computed channels both go; lineage composes and reloads."""
    s = surgery.prune_filters(resnet64, "layer1.0.conv2", [2, 9])
    a = units.prunable_units(s, cifar_x[:1])
    p = surgery.prune_units(s, {"conv1": [2, 3]}, analysis=a)
    assert (run(p, cifar_x) - units.masked_forward(a, cifar_x, {"conv1": [2, 3]})).abs().max() < ATOL
    conv = p.layer1[0].conv2
    assert isinstance(conv, surgery.ScatteredConv2d) and conv.out_channels == 14
    assert surgery.channel_origins(conv) == [i for i in range(16) if i not in (2, 3)]
    assert surgery.kept_channels(p)["layer1.0.conv2"] == [i for i in range(16) if i not in (2, 3, 9)]
    # (no cost check here: UnitAnalysis counts a ScatteredConv2d at its full width)
    surgery.save_pruned(p, tmp_path / "m")
    q = surgery.load_pruned(tmp_path / "m", cp.models.resnet_cifar(20).double())
    assert torch.equal(run(q.eval(), cifar_x), run(p, cifar_x))
    # removing the scattered conv's last zero channel makes it a plain conv again
    a2 = units.prunable_units(p, cifar_x[:1])
    zero = [i for i, o in enumerate(surgery.channel_origins(conv)) if o == 9]
    r = surgery.prune_units(p, {"conv1": zero}, analysis=a2)
    assert type(r.layer1[0].conv2) is nn.Conv2d and r.layer1[0].conv2.out_channels == 13
    assert (run(r, cifar_x) - units.masked_forward(a2, cifar_x, {"conv1": zero})).abs().max() < ATOL


def test_save_load_roundtrip(resnet64, analysis, cifar_x, tmp_path):
    removed = {"conv1": [1, 2], "layer2.0.conv2": [0, 9], "layer3.0.conv2": [30],
               "layer2.1.conv1": [4]}
    p = surgery.prune_units(resnet64, removed, analysis=analysis)
    d = surgery.save_pruned(p, tmp_path / "m")
    assert sorted(f.name for f in d.iterdir()) == ["structure.json", "weights.pt"]
    s = json.loads((d / "structure.json").read_text())
    assert s["version"] == surgery.STRUCTURE_VERSION == 2
    # the option-A shortcut of stage 2 reads 14 stream channels and writes 30 of 32
    sc = s["modules"]["layer2.0.shortcut"]
    assert sc["kind"] == "map" and sc["type"] == "PadShortcut" and sc["in_width"] == 16
    assert sc["in"] == [i for i in range(16) if i not in (1, 2)]
    # stage-2 unit channels 0 and 9 sit at positions 0 and 25; stem channels 1, 2 at 9, 10
    assert sc["out"] == [i for i in range(32) if i not in (0, 9, 10, 25)] and sc["out_width"] == 32
    assert s["layers"]["conv1"] == {"kept": [0, *range(3, 16)], "filters": 16}
    torch.load(d / "weights.pt", weights_only=True)   # plain tensors
    arch = cp.models.resnet_cifar(20).double()
    arch_before = snapshot(arch)
    q = surgery.load_pruned(d, arch)
    assert all(torch.equal(v, arch.state_dict()[k]) for k, v in arch_before.items())
    assert torch.equal(run(q.eval(), cifar_x), run(p, cifar_x))
    assert surgery.kept_channels(q) == surgery.kept_channels(p)
    # the reloaded model prunes further and reloads again
    r = surgery.prune_units(q, {"layer3.2.conv1": [0]}, cifar_x[:1])
    surgery.save_pruned(r, tmp_path / "m2")
    r2 = surgery.load_pruned(tmp_path / "m2", arch)
    assert torch.equal(run(r2.eval(), cifar_x), run(r, cifar_x))


def test_pruned_model_exports(resnet20, cifar_test, tmp_path):
    """A pruned model is a plain module tree: torch.export captures it, and torch.onnx.export
    (its default exporter, as a user calls it) writes an ONNX file that carries the narrowed
    weights and computes what the pruned model computes (run by onnx's reference evaluator, on
    real images the export never saw)."""
    x, _ = cifar_test.sample(8, seed=2).batch(slice(None))
    removed = {"conv1": [0, 5], "layer2.0.conv2": [1], "layer3.1.conv1": [7, 8]}
    p = surgery.prune_units(resnet20.eval(), removed, x[:1])
    ep = torch.export.export(p, (x[:4],))
    torch.testing.assert_close(ep.module()(x[4:]), run(p, x[4:]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ep.module()(x[4:]), run(resnet20, x[4:]), rtol=1e-3, atol=1e-3)

    model, got = onnx_run(p, x[:4], x[4:], tmp_path / "pruned.onnx")
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight",
                 "layer3.1.conv1.weight", "layer3.1.conv2.weight", "linear.weight"):
        assert weights[name] == tuple(p.state_dict()[name].shape), name
    assert weights["conv1.weight"][0] == 14 and weights["layer3.1.conv1.weight"][0] == 62
    torch.testing.assert_close(got, run(p, x[4:]), rtol=1e-4, atol=1e-4)


# -- errors --------------------------------------------------------------------------------------
def test_errors_name_the_problem(resnet64, analysis, cifar_x):
    before = snapshot(resnet64)
    cases = [
        ({"layer9.conv1": [0]}, ValueError, r"unit 'layer9\.conv1', which the network does not have"
                                            r"; its units are: conv1, layer1\.0\.conv1"),
        ({"conv1": list(range(16))}, ValueError, r"cannot remove all 16 channels of unit 'conv1'"),
        ({"conv1": [3, 16]}, ValueError, r"unit 'conv1'.* must be in 0\.\.15 .*got \[16\]"),
        ({"conv1": [-1]}, ValueError, r"must be in 0\.\.15"),
        ({"conv1": [2, 2, 4]}, ValueError, r"duplicate channel indices for unit 'conv1': \[2\]"),
        ({"conv1": 3}, ValueError, r"single integer 3"),
        ({"conv1": [1.5]}, ValueError, r"must be integers, got 1\.5"),
        ([("conv1", [0])], TypeError, r"removed must map unit names"),
    ]
    for removed, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            surgery.prune_units(resnet64, removed, analysis=analysis)
    with pytest.raises(ValueError, match=r"needs example_input .* or analysis="):
        surgery.prune_units(resnet64, {"conv1": [0]})
    with pytest.raises(TypeError, match=r"analysis must be a UnitAnalysis"):
        surgery.prune_units(resnet64, {"conv1": [0]}, analysis={"conv1": 16})
    # an analysis of another (here: already pruned) model
    other = surgery.prune_units(resnet64, {"layer1.0.conv1": [0]}, analysis=analysis)
    with pytest.raises(ValueError, match=r"analysis does not describe this model: module "
                                         r"'layer1\.0\.conv1'"):
        surgery.prune_units(other, {"layer1.0.conv1": [1]}, analysis=analysis)
    after = resnet64.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Scale(nn.Module):
    """A per-channel scale whose parameter is not called `weight`: declared channel-wise with
    PReLU-like parameters, which surgery cannot find."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n, 1, 1))

    def forward(self, x):
        return x * self.scale


class _WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = _Scale(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.scale(self.conv(x)))


def test_module_that_cannot_be_narrowed_is_refused():
    opsem.register_channelwise(_Scale, keeps_zero=True, params="prelu")
    m = _WithScale().eval()
    a = units.prunable_units(m, torch.zeros(1, 3, 8, 8))
    assert a.unit("conv").through == ("scale",)
    with pytest.raises(ValueError, match=r"unit 'conv' needs module 'scale' narrowed as prelu, but "
                                         r"it is a _Scale, not a module with one weight per channel"):
        surgery.prune_units(m, {"conv": [1]}, analysis=a)


class _FrozenBN(nn.Module):
    """A BatchNorm whose statistics and affine terms are buffers (as detection code freezes it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n)
        for k in ("weight", "bias", "running_mean"):
            self.register_buffer(k, torch.randn(n, generator=g, dtype=torch.float64))
        self.register_buffer("running_var", torch.rand(n, generator=g, dtype=torch.float64) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def test_a_custom_batchnorm_with_buffers_is_narrowed_as_one():
    opsem.register_channelwise(_FrozenBN, keeps_zero=False, params="bn")
    m = nn.Sequential(nn.Conv2d(3, 6, 3), _FrozenBN(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = units.prunable_units(m, x)
    removed = {a.units[0].name: [1, 4]}
    pruned = surgery.prune_units(m, removed, analysis=a)
    assert pruned[1].weight.shape == (4,)
    torch.testing.assert_close(pruned(x), units.masked_forward(a, x, removed), rtol=0, atol=1e-12)
    assert a.total_params(removed) == sum(p.numel() for p in pruned.parameters())


class _TrainingHead(nn.Module):
    """An auxiliary head used only in training mode: the eval-mode trace never sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc, self.aux = nn.Linear(8, 10), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        out = self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(y)), 1).flatten(1))
        return (out, self.aux(y)) if self.training else out


def test_modules_the_eval_trace_does_not_call_are_named_and_counted(caplog):
    m = _TrainingHead().eval()
    with caplog.at_level("WARNING", logger="carprune"):
        a = units.prunable_units(m, torch.zeros(1, 3, 12, 12))
    assert a.untraced == ["aux"] and "modules aux are not called in eval mode" in caplog.text
    pruned = surgery.prune_units(m, {"c": [0, 3]}, analysis=a)
    assert a.total_params({"c": [0, 3]}) == sum(p.numel() for p in pruned.parameters())


class _SharedShortcut(nn.Module):
    """One (parameter-free) padding shortcut module called on two different tensors."""

    def __init__(self) -> None:
        super().__init__()
        from carprune.models.resnet_cifar import PadShortcut

        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.sc = PadShortcut(2)
        self.head_a = nn.Conv2d(8, 2, 1)
        self.head_b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head_a(self.sc(self.a(x))) + self.head_b(self.sc(self.b(x)))


def test_shared_module_is_refused():
    m = _SharedShortcut().eval()
    a = units.prunable_units(m, torch.zeros(1, 3, 8, 8))
    assert [u.name for u in a] == ["a", "b"]
    with pytest.raises(ValueError, match=r"module 'sc' is called 2 times in forward\(\)"):
        surgery.prune_units(m, {"a": [1]}, analysis=a)


class _Grouped(nn.Module):
    """A ResNeXt-like block (a grouped conv between two plain ones) and a conv called twice:
    layers that no unit changes, whose FLOPs still count."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.p = nn.Conv2d(16, 24, 3, padding=1)
        self.q = nn.Conv2d(24, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 1)
        self.b = nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.c = nn.Conv2d(32, 16, 1)
        self.twice = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.q(F.relu(self.p(F.relu(self.stem(x))))))
        x = F.relu(x + self.c(F.relu(self.b(F.relu(self.a(x))))))
        x = self.twice(F.relu(self.twice(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_cost_counts_the_layers_no_unit_changes():
    m = _Grouped().eval()
    x = torch.zeros(1, 3, 16, 16)
    a = units.prunable_units(m, x)
    assert [u.name for u in a] == ["stem", "p"]
    assert a.cost()[0] == count_cost(m, (3, 16, 16)).total_flops
    removed = {"stem": [1], "p": [0, 5, 9]}
    pruned = surgery.prune_units(m, removed, analysis=a)
    assert a.cost(removed)[0] == count_cost(pruned, (3, 16, 16)).total_flops
    assert a.cost(removed)[0] < a.cost()[0]


# -- torchvision models --------------------------------------------------------------------------
def torchvision_arch(name: str) -> nn.Module:
    """torchvision's `name` (seeded random init, 10 classes), float64. vgg11_bn's 25088 x 4096
    classifier is made 25088 x 64 (the same structure, a flatten of 512 channels x 49 positions
    feeding a linear layer, without 1 GB of float64 weights per copy)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    if name == "vgg11_bn":
        model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 10)
    return model.double()


def torchvision_model(name: str, x: torch.Tensor) -> nn.Module:
    """`torchvision_arch(name)` with the BatchNorm statistics of `x`, in eval mode."""
    model = torchvision_arch(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def images64(cifar_test):
    x, _ = cifar_test.sample(8, seed=11).batch(slice(None))
    return F.interpolate(x.double(), size=(64, 64), mode="bilinear", align_corners=False)


@pytest.mark.torchvision
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121",
                                  "efficientnet_b0"])
def test_torchvision_pruned_equals_masked(name, images64, tmp_path):
    model = torchvision_model(name, images64)
    x = images64[:4]
    a = units.prunable_units(model, x[:1])
    coupled = [u for u in a if u.kind == "coupled"]
    single = [u for u in a if u.kind != "coupled"]
    assert single and (coupled or name in ("vgg11_bn", "densenet121"))
    picked = coupled[:2] + single[:2] + [a.units[-1]] + ([coupled[-1]] if coupled else [])
    rng = random.Random(name)
    removed = {u.name: sorted(rng.sample(range(u.num_channels), max(1, u.num_channels // 8)))
               for u in picked}
    pruned = surgery.prune_units(model, removed, analysis=a)
    ref = units.masked_forward(a, x, removed)
    got = run(pruned, x)
    assert (got - ref).abs().max().item() < ATOL
    assert (run(model, x) - ref).abs().max().item() > 1e-6   # the removal matters
    check_cost(model, pruned, a, removed, (3, 64, 64))
    # reload from a fresh instance of the original architecture
    surgery.save_pruned(pruned, tmp_path / "m")
    q = surgery.load_pruned(tmp_path / "m", torchvision_arch(name))
    assert torch.equal(run(q.eval(), x), got)
    # and exports to ONNX: the file, run on the other 4 images, computes the pruned model's
    # outputs
    _, out = onnx_run(pruned, x, images64[4:], tmp_path / "m.onnx")
    assert (out - run(pruned, images64[4:])).abs().max().item() < ATOL


@pytest.mark.torchvision
def test_per_layer_and_unit_surgery_agree_through_a_depthwise_conv(images64):
    """An inverted-residual expansion conv: its filter unit runs through BN, ReLU6, the depthwise
    conv and its BN. prune_filters (narrow form) and prune_units give the same network."""
    model = torchvision_model("mobilenet_v2", images64)
    x = images64[:4]
    a = units.prunable_units(model, x[:1])
    layer, remove = "features.7.conv.0.0", [0, 5, 100]
    assert a.unit(layer).through == ("features.7.conv.0.1", "features.7.conv.1.0",
                                     "features.7.conv.1.1")
    ref = units.masked_forward(a, x, {layer: remove})
    per_layer = surgery.prune_filters(model, layer, remove)
    unit = surgery.prune_units(model, {layer: remove}, analysis=a)
    dw = per_layer.features[7].conv[1][0]
    assert dw.in_channels == dw.out_channels == dw.groups == 189 and dw.weight.shape[0] == 189
    for p in (per_layer, unit):
        assert (run(p, x) - ref).abs().max().item() < ATOL
        assert count_cost(p, (3, 64, 64)).total_flops == a.cost({layer: remove})[0]
