"""Structural pruning against independent references (count_cost itself: test_cost.py).

The reference for a pruned model is the unpruned model with the removed filters' channels zeroed
by a forward hook at the cut; the cut modules are written out here by hand (as in test_engine),
not taken from carprune.graph.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import carprune as cp
from carprune import graph, surgery
from carprune.cost import count_cost

# layer -> the module after which its filters' outputs are consumed
RESNET_CUTS = {
    "conv1": "relu",                       # stem: feeds layer1.0.conv1 and the identity shortcut
    "layer1.0.conv1": "layer1.0.relu1",
    "layer1.0.conv2": "layer1.0.bn2",      # feeds the residual add
    "layer2.0.conv1": "layer2.0.relu1",    # stride 2
    "layer3.2.conv1": "layer3.2.relu1",
}
LENET_CUTS = {"conv1": "pool1", "conv2": "pool2"}  # conv2 feeds flatten -> fc1


def masked_output(model: nn.Module, zero: dict[str, list[int]], x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with channels zero[cut module] zeroed at the output of each cut module."""
    modules = dict(model.named_modules())
    handles = []
    for name, chans in zero.items():
        def hook(mod, inp, out, chans=chans):
            out = out.clone()
            out[:, chans] = 0
            return out
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet64(resnet20):
    return copy.deepcopy(resnet20).double().eval()


@pytest.fixture(scope="module")
def lenet64(lenet):
    return copy.deepcopy(lenet).double().eval()


@pytest.fixture(scope="module")
def cifar_x(cifar_test):
    x, _ = cifar_test.sample(12, seed=3).batch(slice(None))
    return x.double()


@pytest.fixture(scope="module")
def mnist_x(mnist_test):
    x, _ = mnist_test.sample(64, seed=3).batch(slice(None))
    return x.double()


@pytest.mark.parametrize("net, layer, remove", [
    ("resnet", "conv1", [0, 5, 15]),
    ("resnet", "layer1.0.conv1", [0, 7, 15]),
    ("resnet", "layer2.0.conv1", [0, 13, 31]),
    ("resnet", "layer3.2.conv1", [1, 30, 63]),
    ("resnet", "layer1.0.conv2", [2, 9]),
    ("lenet", "conv1", [0, 11, 19]),
    ("lenet", "conv2", [0, 17, 49]),
])
def test_pruned_equals_masked_in_float64(request, net, layer, remove):
    model = request.getfixturevalue("resnet64" if net == "resnet" else "lenet64")
    x = request.getfixturevalue("cifar_x" if net == "resnet" else "mnist_x")
    cuts = RESNET_CUTS if net == "resnet" else LENET_CUTS
    before = snapshot(model)
    n = model.get_submodule(layer).out_channels
    pruned = surgery.prune_filters(model, layer, remove)

    ref = masked_output(model, {cuts[layer]: remove}, x)
    got = run(pruned, x)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max().item() < 1e-10
    # the removal matters: the unmasked model gives clearly different logits
    assert (run(model, x) - ref).abs().max().item() > 1e-4

    # the input model is untouched
    assert type(model.get_submodule(layer)) is nn.Conv2d
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    kept = [i for i in range(n) if i not in remove]
    assert surgery.kept_channels(pruned) == {layer: kept}
    conv = pruned.get_submodule(layer)
    assert conv.weight.shape[0] == len(kept)
    torch.testing.assert_close(conv.weight, model.get_submodule(layer).weight[kept], rtol=0, atol=0)


def test_narrow_and_scatter_structure(resnet20, lenet):
    # plain chain: conv, BN and the consumer conv all shrink
    p = surgery.prune_filters(resnet20, "layer3.2.conv1", [1, 30, 63])
    assert type(p.layer3[2].conv1) is nn.Conv2d and p.layer3[2].conv1.out_channels == 61
    assert p.layer3[2].bn1.num_features == 61 and p.layer3[2].bn1.running_var.shape == (61,)
    assert p.layer3[2].conv2.in_channels == 61 and p.layer3[2].conv2.weight.shape == (64, 61, 3, 3)
    # conv -> pool -> flatten -> fc1: 16 columns per channel go
    q = surgery.prune_filters(lenet, "conv2", [0, 17, 49])
    assert q.fc1.in_features == 47 * 16 and q.fc1.weight.shape == (500, 47 * 16)
    torch.testing.assert_close(q.fc1.weight[:, :16], lenet.fc1.weight[:, 16:32], rtol=0, atol=0)
    # residual add: full width kept by scattering; BN zero on removed channels
    r = surgery.prune_filters(resnet20, "layer1.0.conv2", [2, 9])
    conv = r.layer1[0].conv2
    assert isinstance(conv, surgery.ScatteredConv2d) and conv.out_channels == 16
    assert conv.weight.shape == (14, 16, 3, 3) and conv.num_kept == 14
    assert conv.out_index.tolist() == [i for i in range(16) if i not in (2, 9)]
    bn = r.layer1[0].bn2
    assert bn.num_features == 16 and bn.weight[[2, 9]].abs().sum() == 0 and bn.bias[[2, 9]].abs().sum() == 0
    assert torch.equal(bn.weight[0], resnet20.layer1[0].bn2.weight[0])
    # the pruned model still traces with the scattered conv as one node
    gm = graph.trace(r)
    cut = graph.find_cut(gm, "layer1.0.conv2")
    assert cut.conv_node.op == "call_module" and cut.node.target == "layer1.0.bn2"


def test_float32_close_on_real_data(resnet20, lenet, cifar_test, mnist_test):
    x, _ = cifar_test.sample(32, seed=8).batch(slice(None))
    for layer, remove in (("layer1.0.conv2", [0, 4, 11]), ("conv1", [3, 8])):
        p = surgery.prune_filters(resnet20, layer, remove)
        ref = masked_output(resnet20, {RESNET_CUTS[layer]: remove}, x)
        got = run(p, x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), ref.argmax(1))
    xm, _ = mnist_test.sample(100, seed=8).batch(slice(None))
    p = surgery.prune_filters(lenet, "conv2", list(range(0, 50, 3)))
    torch.testing.assert_close(run(p, xm), masked_output(lenet, {"pool2": list(range(0, 50, 3))}, xm),
                               rtol=1e-4, atol=1e-4)


def test_prune_twice_same_layer(resnet64, cifar_x):
    # narrowed layer: the second call numbers the 62 remaining filters 0..61
    once = surgery.prune_filters(resnet64, "layer3.2.conv1", [3, 7])
    twice = surgery.prune_filters(once, "layer3.2.conv1", [0, 5])   # originals 0 and 6
    gone = [0, 3, 6, 7]
    assert surgery.kept_channels(twice)["layer3.2.conv1"] == [i for i in range(64) if i not in gone]
    assert surgery.kept_channels(once)["layer3.2.conv1"] == [i for i in range(64) if i not in (3, 7)]
    assert surgery.channel_origins(twice.layer3[2].conv1) == [i for i in range(64) if i not in gone]
    ref = masked_output(resnet64, {"layer3.2.relu1": gone}, cifar_x)
    assert (run(twice, cifar_x) - ref).abs().max().item() < 1e-10
    # scattered layer: output channels keep their original numbering
    s1 = surgery.prune_filters(resnet64, "layer1.0.conv2", [1, 4])
    with pytest.raises(ValueError, match=r"already removed"):
        surgery.prune_filters(s1, "layer1.0.conv2", [4])
    s2 = surgery.prune_filters(s1, "layer1.0.conv2", [2, 15])
    assert s2.layer1[0].conv2.out_index.tolist() == [0, 3, *range(5, 15)]
    assert surgery.kept_channels(s2) == {"layer1.0.conv2": [0, 3, *range(5, 15)]}
    assert surgery.channel_origins(s2.layer1[0].conv2) == list(range(16))
    ref = masked_output(resnet64, {"layer1.0.bn2": [1, 2, 4, 15]}, cifar_x)
    assert (run(s2, cifar_x) - ref).abs().max().item() < 1e-10


def test_prune_two_layers(resnet64, lenet64, cifar_x, mnist_x):
    # stem (scattered) then the block conv it feeds (narrowed; its inputs stay full width)
    p = surgery.prune_filters(resnet64, "conv1", [0, 5])
    p = surgery.prune_filters(p, "layer1.0.conv1", [1, 2, 14])
    p = surgery.prune_filters(p, "layer2.0.conv1", [31])
    assert surgery.kept_channels(p).keys() == {"conv1", "layer1.0.conv1", "layer2.0.conv1"}
    ref = masked_output(resnet64, {"relu": [0, 5], "layer1.0.relu1": [1, 2, 14],
                                   "layer2.0.relu1": [31]}, cifar_x)
    assert (run(p, cifar_x) - ref).abs().max().item() < 1e-10
    # LeNet: conv1 narrows conv2's inputs, then conv2 narrows fc1
    q = surgery.prune_filters(lenet64, "conv1", [4, 19])
    q = surgery.prune_filters(q, "conv2", [10, 11, 12])
    assert q.conv2.weight.shape == (47, 18, 5, 5) and q.fc1.in_features == 47 * 16
    ref = masked_output(lenet64, {"pool1": [4, 19], "pool2": [10, 11, 12]}, mnist_x)
    assert (run(q, mnist_x) - ref).abs().max().item() < 1e-10


def test_bad_indices_are_named(resnet20):
    cases = [([], r"no filters given"), ([3, 3, 5], r"duplicate filter indices \[3\]"),
             ([2, 16], r"\[16\] are out of range.*16 output channels"), ([-1], r"out of range"),
             (list(range(16)), r"cannot remove all 16"), ([1.5], r"must be integers"),
             (torch.tensor([[1, 2]]), r"one-dimensional"), (3, r"single integer")]
    for idx, msg in cases:
        with pytest.raises(ValueError, match=msg):
            surgery.prune_filters(resnet20, "layer1.0.conv1", idx)
    with pytest.raises(graph.CutError, match=r"unknown layer 'layer9.conv1'"):
        surgery.prune_filters(resnet20, "layer9.conv1", [0])
    with pytest.raises(graph.CutError, match=r"not a Conv2d"):
        surgery.prune_filters(resnet20, "layer1.0.bn1", [0])
    # numpy / tensor index lists are accepted
    a = surgery.prune_filters(resnet20, "layer1.0.conv1", torch.tensor([1, 2]))
    assert a.layer1[0].conv1.out_channels == 14


class _SigmoidResidual(nn.Module):
    """conv -> sigmoid -> residual add: a removed filter would leave 0.5, not 0, in the add."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.act = act
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))) + x).mean((2, 3))


def test_scatter_needs_zero_preserving_chain():
    torch.manual_seed(0)
    with pytest.raises(graph.CutError, match=r"add.*Sigmoid|act does not map 0 to 0"):
        surgery.prune_filters(_SigmoidResidual(nn.Sigmoid()).eval(), "conv", [1])
    # with ReLU (and a BatchNorm without affine parameters) it works
    m = _SigmoidResidual(nn.ReLU()).eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    m = m.double()
    p = surgery.prune_filters(m, "conv", [0, 2])
    ref = masked_output(m, {"act": [0, 2]}, x)
    assert (run(p, x) - ref).abs().max().item() < 1e-12


class _Small(nn.Module):
    """conv -> BN -> per-channel PReLU -> pool -> flatten -> dropout -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.PReLU(6)
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.drop(self.flat(self.pool(self.act(self.bn(self.conv(x)))))))


def test_narrow_prelu_and_flatten_dropout_linear():
    torch.manual_seed(1)
    m = _Small().double().eval()
    with torch.no_grad():
        for t in (m.bn.weight, m.bn.bias, m.bn.running_mean, m.act.weight):
            t.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    p = surgery.prune_filters(m, "conv", [1, 4])
    assert p.act.weight.shape == (4,) and p.bn.num_features == 4 and p.fc.in_features == 36
    assert (run(p, x) - masked_output(m, {"pool": [1, 4]}, x)).abs().max().item() < 1e-12


def test_pruned_model_scores_like_masked(resnet20, cifar_test):
    """The scoring engine on a pruned (scattered) layer numbers channels as prune_filters does:
    CAR counts match the original model's scorer with the same filters removed."""
    data = cifar_test.sample(32, seed=9)
    removed = [2, 9]
    pruned = surgery.prune_filters(resnet20, "layer1.0.conv2", removed)
    a = cp.LayerScorer(pruned, "layer1.0.conv2", data, progress=False)
    b = cp.LayerScorer(resnet20, "layer1.0.conv2", data, progress=False)
    b.remove(removed)
    assert a.num_filters == 16
    with pytest.raises(ValueError, match="out of range"):
        a.score([16])
    sa, sb = a.score([0, 15]), b.score([0, 15])
    # float32: the 14-filter conv may round differently from the 16-filter one; allow one flip
    assert (sa.counts - sb.counts).abs().sum().item() <= 1
    assert abs(sa.base_accuracy - sb.base_accuracy) <= 1 / 32


# -- save / load ---------------------------------------------------------------------------------
def _pruned_resnet(resnet20):
    p = surgery.prune_filters(resnet20, "conv1", [0, 5])
    p = surgery.prune_filters(p, "layer3.2.conv1", [3, 7])
    p = surgery.prune_filters(p, "layer3.2.conv1", [0, 5])
    return surgery.prune_filters(p, "layer1.0.conv2", [1])


def test_save_load_roundtrip(resnet20, cifar_test, tmp_path):
    p = _pruned_resnet(resnet20)
    surgery.save_pruned(p, tmp_path / "m")
    files = sorted(f.name for f in (tmp_path / "m").iterdir())
    assert files == ["structure.json", "weights.pt"]  # no temp files left behind
    structure = json.loads((tmp_path / "m" / "structure.json").read_text())
    assert structure["format"] == surgery.STRUCTURE_FORMAT and structure["version"] == 2
    kept = [i for i in range(64) if i not in (0, 3, 6, 7)]
    assert structure["layers"]["layer3.2.conv1"] == {"kept": kept, "filters": 64}
    # every narrowed module records its kept original inputs and outputs
    assert structure["modules"]["layer3.2.conv1"] == {
        "kind": "conv", "type": "Conv2d", "in": list(range(64)), "in_width": 64, "out": kept,
        "out_width": 64}
    assert structure["modules"]["layer3.2.bn1"]["out"] == kept
    assert structure["modules"]["layer3.2.conv2"]["in"] == kept
    assert structure["modules"]["layer1.0.conv2"]["kept"] == [0, *range(2, 16)]
    assert structure["modules"]["layer1.0.conv2"]["out"] == list(range(16))
    assert "layer1.0.bn2" not in structure["modules"]   # scattered: its BN keeps full width
    # plain tensors only: loads without unpickling code
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert state["layer1.0.conv2.out_index"].tolist() == [0, *range(2, 16)]

    arch = cp.models.resnet_cifar(20)  # fresh, randomly initialised original architecture
    arch_before = snapshot(arch)
    q = surgery.load_pruned(tmp_path / "m", arch)
    assert surgery.kept_channels(q) == surgery.kept_channels(p)
    assert all(torch.equal(v, arch.state_dict()[k]) for k, v in arch_before.items())
    assert surgery.kept_channels(arch) == {}
    x, _ = cifar_test.sample(32, seed=6).batch(slice(None))
    assert torch.equal(run(q.eval(), x), run(p, x))
    # a reloaded model can be pruned further and saved again
    r = surgery.prune_filters(q, "layer3.2.conv1", [0])
    surgery.save_pruned(r, tmp_path / "m2")
    r2 = surgery.load_pruned(tmp_path / "m2", arch)
    assert surgery.kept_channels(r2)["layer3.2.conv1"][0] == 2
    assert torch.equal(run(r2.eval(), x), run(r, x))


def test_load_version_1_structure(resnet20, cifar_test, tmp_path):
    """A structure.json of version 1 (layers only) is rebuilt by re-applying the per-layer surgery."""
    p = _pruned_resnet(resnet20)
    d = tmp_path / "v1"
    surgery.save_pruned(p, d)
    s = json.loads((d / "structure.json").read_text())
    (d / "structure.json").write_text(json.dumps(
        {"format": s["format"], "version": 1, "layers": s["layers"]}))
    q = surgery.load_pruned(d, cp.models.resnet_cifar(20))
    assert surgery.kept_channels(q) == surgery.kept_channels(p)
    x, _ = cifar_test.sample(16, seed=6).batch(slice(None))
    assert torch.equal(run(q.eval(), x), run(p, x))


def test_load_errors_name_the_problem(resnet20, lenet, tmp_path):
    p = _pruned_resnet(resnet20)
    d = tmp_path / "m"
    surgery.save_pruned(p, d)
    arch = cp.models.resnet_cifar(20)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        surgery.load_pruned(tmp_path / "nothing", arch)
    with pytest.raises(ValueError, match="already pruned"):
        surgery.load_pruned(d, p)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2.*LeNet5 lacks"):
        surgery.load_pruned(d, lenet)

    def variant(name, edit_structure=None, weights=None):
        v = tmp_path / name
        surgery.save_pruned(p, v)
        if edit_structure is not None:
            s = json.loads((v / "structure.json").read_text())
            edit_structure(s)
            (v / "structure.json").write_text(json.dumps(s))
        if weights is not None:
            (v / "weights.pt").write_bytes(weights)
        return v

    with pytest.raises(ValueError, match=r"weights\.pt is not a PyTorch checkpoint, or it is corrupt"):
        surgery.load_pruned(variant("corrupt", weights=b"not a torch file"), arch)
    v = variant("noweights")
    (v / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights not found"):
        surgery.load_pruned(v, arch)
    v = variant("nostructure")
    (v / "structure.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"structure not found"):
        surgery.load_pruned(v, arch)
    (v / "structure.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        surgery.load_pruned(v, arch)
    def v1(s):
        s.update(version=1)
        del s["modules"]

    entry = {"kind": "conv", "type": "Conv2d", "in": [0], "in_width": 8, "out": [0], "out_width": 8}
    with pytest.raises(ValueError, match=r"layer4\.0\.conv1.*lacks"):
        surgery.load_pruned(variant("unknown", lambda s: s["modules"].update(
            {"layer4.0.conv1": entry})), arch)
    with pytest.raises(ValueError, match=r"layer4\.0\.conv1.*lacks"):
        surgery.load_pruned(variant("unknown1", lambda s: (v1(s), s["layers"].update(
            {"layer4.0.conv1": {"kept": [0], "filters": 8}}))), arch)
    with pytest.raises(ValueError, match=r"'layer3\.2\.conv1' has 64 output channels and 64 inputs "
                                         r"in the given architecture but 64 and 65"):
        surgery.load_pruned(variant("width", lambda s: s["modules"]["layer3.2.conv1"].update(
            in_width=65)), arch)
    with pytest.raises(ValueError, match=r"'conv1' has 16 filters in the given architecture but 32"):
        surgery.load_pruned(variant("width1", lambda s: (v1(s), s["layers"]["conv1"].update(
            filters=32))), arch)
    with pytest.raises(ValueError, match=r"module 'layer1\.0\.bn1' as a Conv2d.*BatchNorm2d"):
        surgery.load_pruned(variant("type", lambda s: s["modules"].update(
            {"layer1.0.bn1": {**entry, "in_width": 16, "out_width": 16}})), arch)
    with pytest.raises(ValueError, match=r"not a carprune pruned-model structure"):
        surgery.load_pruned(variant("format", lambda s: s.update(format="other")), arch)
    with pytest.raises(ValueError, match=r"version 99"):
        surgery.load_pruned(variant("version", lambda s: s.update(version=99)), arch)
    with pytest.raises(ValueError, match=r"increasing indices"):
        surgery.load_pruned(variant("range", lambda s: s["layers"]["conv1"].update(kept=[3, 16])), arch)
    with pytest.raises(ValueError, match=r"'out' of module 'layer3\.2\.conv1' must be increasing"):
        surgery.load_pruned(variant("range2", lambda s: s["modules"]["layer3.2.conv1"].update(
            out=[5, 3])), arch)
    with pytest.raises(ValueError, match=r"layer 'layer3\.2\.conv1' keeps filters .* in 'modules'"):
        surgery.load_pruned(variant("disagree", lambda s: s["modules"]["layer3.2.conv1"].update(
            out=list(range(10)))), arch)
    # a structure that disagrees with the weights fails the strict load
    def fewer(s):
        s["modules"]["layer3.2.conv1"]["out"] = s["layers"]["layer3.2.conv1"]["kept"] = list(range(10))

    with pytest.raises(ValueError, match=r"do not fit the rebuilt pruned model"):
        surgery.load_pruned(variant("mismatch", fewer), arch)
    with pytest.raises(ValueError, match=r"do not fit the rebuilt pruned model"):
        surgery.load_pruned(variant("mismatch1", lambda s: (v1(s), s["layers"]["layer3.2.conv1"].update(
            kept=list(range(10))))), arch)


def test_copy_model_is_independent(resnet20):
    c = surgery.copy_model(resnet20)
    assert c is not resnet20
    with torch.no_grad():
        c.conv1.weight.zero_()
    assert resnet20.conv1.weight.abs().sum() > 0


# -- linear neurons and Conv1d filters -------------------------------------------------------------
def test_lenet5_fc1_pruned_equals_masked(lenet, mnist_test, tmp_path):
    """Removing fc1 neurons removes fc1's rows and fc2's columns; the smaller network computes
    what LeNet-5 computes with those features zeroed after fc1's ReLU."""
    m64 = copy.deepcopy(lenet).double()
    x = mnist_test.batch(slice(0, 200))[0].double()
    removed = list(range(3, 500, 7))
    p = surgery.prune_filters(m64, "fc1", removed)
    kept = [i for i in range(500) if i not in removed]
    assert p.fc1.out_features == len(kept) == p.fc2.in_features
    assert p.fc1.weight.shape == (len(kept), 800) and p.fc2.weight.shape == (10, len(kept))
    assert torch.equal(p.fc1.bias, m64.fc1.bias[kept]) and torch.equal(p.fc2.weight, m64.fc2.weight[:, kept])
    assert (run(p, x) - masked_output(m64, {"relu": removed}, x)).abs().max().item() < 1e-12
    assert surgery.kept_channels(p) == {"fc1": kept}
    # pruning again numbers the neurons as the model computes them now
    q = surgery.prune_filters(p, "fc1", [0, 1])
    assert surgery.kept_channels(q) == {"fc1": kept[2:]}
    assert (run(q, x) - masked_output(m64, {"relu": removed + kept[:2]}, x)).abs().max().item() < 1e-12
    surgery.save_pruned(q, tmp_path / "fc")
    back = surgery.load_pruned(tmp_path / "fc", cp.models.lenet5().double())
    assert torch.equal(run(back, x), run(q, x))
    # the cost of the narrowed layers
    rep = count_cost(q, (1, 28, 28))
    assert rep.layer("fc1").flops == 800 * (len(kept) - 2)
    assert rep.layer("fc2").flops == (len(kept) - 2) * 10


def test_conv1d_and_batchnorm1d_narrowed():
    from test_engine import conv1d_net

    m = conv1d_net()
    x = torch.randn(9, 2, 32, dtype=torch.float64)
    p = surgery.prune_filters(m, "conv1", [0, 5, 11])
    assert p.conv1.out_channels == 9 and p.bn1.num_features == 9 and p.conv2.in_channels == 9
    assert (run(p, x) - masked_output(m, {"pool1": [0, 5, 11]}, x)).abs().max().item() < 1e-12
    # conv2 feeds pool -> flatten -> fc: fc loses each channel's block of 4 columns
    p2 = surgery.prune_filters(m, "conv2", [1, 6])
    assert p2.conv2.out_channels == 6 and p2.fc.in_features == 24
    assert (run(p2, x) - masked_output(m, {"pool2": [1, 6]}, x)).abs().max().item() < 1e-12


def test_linear_feeding_a_residual_add_is_refused():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) + x)

    with pytest.raises(graph.CutError, match="only Conv2d layers keep their width by scattering"):
        surgery.prune_filters(Mlp(), "fc1", [0])
