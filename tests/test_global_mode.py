"""Global compression over whole-network units (`carprune.global_mode`), on the pretrained
LeNet-5 and ResNet-20 and real images, against references written independently: accuracies
with channels zeroed by forward hooks in float64, FLOPs saved counted by hand."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import carprune as cp
from carprune import callbacks, importance
from carprune.global_mode import GlobalCompressionResult, compress_global, compress_layers
from carprune.units import prunable_units

# where each LeNet-5 unit's channel is read by the next mixing layer (hooks zero it there)
LENET_SITES = {"conv1": "pool1", "conv2": "pool2", "fc1": "relu"}
# multiply-accumulates one channel saves, by hand: its own MACs + its consumer's on it
LENET_SAVED = {"conv1": 24 * 24 * 25 + 8 * 8 * 50 * 25,      # conv1 filter, conv2's input map
               "conv2": 8 * 8 * 20 * 25 + 16 * 500,          # conv2 filter, fc1's 4x4 columns
               "fc1": 800 + 10}                              # fc1 neuron, fc2's column


def hooked_accuracy(model, zero: dict[str, list[int]], x, y) -> float:
    mods = dict(model.named_modules())
    handles = []
    for site, chans in zero.items():
        def hook(mod, inp, out, chans=chans):
            out = out.clone()
            out[:, chans] = 0
            return out
        handles.append(mods[site].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return (model(x).argmax(1) == y).double().mean().item()
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def lenet_split(mnist_test):
    return mnist_test.sample(400, seed=0).split(0.5, seed=0)


def test_first_round_takes_lowest_car_per_flop_and_flops_fall(lenet, lenet_split):
    score, hold = lenet_split
    x, y = score.batch(slice(None))
    m64 = copy.deepcopy(lenet).double().eval()
    car = importance.CAR(score, dtype=torch.float64)
    res = compress_global(lenet, "all", score, eval_data=hold, flops_target=0.9, per_round=1,
                          criterion=car)
    base = hooked_accuracy(m64, {}, x.double(), y)
    keys = []
    for unit, site in LENET_SITES.items():
        n = getattr(lenet, unit).out_channels if unit != "fc1" else 500
        for c in range(n):
            v = base - hooked_accuracy(m64, {site: [c]}, x.double(), y)
            s = LENET_SAVED[unit]
            keys.append(((v / s, -s) if v > 0 else (v * s, -s), list(LENET_SITES).index(unit),
                         c, unit, v))
    first = min(keys)
    r0 = res.trajectory[0].removed[0]
    assert (r0.unit, r0.channel) == (first[3], first[2])
    assert r0.importance == pytest.approx(first[4]) and r0.flops_saved == LENET_SAVED[first[3]]
    # FLOPs: trajectory, analysis and the physical model agree; the target is met
    assert res.flops <= 0.9 * res.base_flops < res.trajectory[-2].flops
    assert cp.count_cost(res.model, (1, 28, 28)).total_flops == res.flops
    assert sum(p.numel() for p in res.model.parameters()) == res.trajectory[-1].params
    # the hold-out accuracy in the trajectory is the pruned model's
    xh, yh = hold.batch(slice(None))
    with torch.no_grad():
        acc = (res.model(xh).argmax(1) == yh).double().mean().item()
    assert acc == pytest.approx(res.trajectory[-1].holdout_accuracy)
    # and the pruned model is the original with the removed channels zeroed where read
    zero = {LENET_SITES[u]: c for u, c in res.removed.items() if c}
    with torch.no_grad():
        ref = hooked_accuracy(m64, zero, xh.double(), yh)
    assert acc == pytest.approx(ref)


def test_rounds_take_one_channel_per_unit_and_rescore(resnet20, cifar_test):
    data = cifar_test.sample(60, seed=1)
    res = compress_global(resnet20, ["layer3.1.conv1", "layer3.2.conv1", "layer3.0.conv2"],
                          data, flops_target=0.97, per_round=2)
    for r in res.trajectory:
        assert len({c.unit for c in r.removed}) == len(r.removed) <= 2
    # round 2's choice is the lowest CAR per FLOP on the network pruned by round 1
    after1 = cp.prune_units(resnet20, {c.unit: [c.channel] for c in res.trajectory[0].removed},
                            torch.zeros(1, 3, 32, 32))
    an = prunable_units(after1, torch.zeros(1, 3, 32, 32))
    full = prunable_units(resnet20, torch.zeros(1, 3, 32, 32))
    gone = {c.unit: [c.channel] for c in res.trajectory[0].removed}
    sc = cp.score_units(after1, data, res.units, analysis=an)
    best = None
    for u in res.units:
        alive = [c for c in range(full.unit(u).num_channels) if c not in gone.get(u, [])]
        saved = full.saved_flops(u, gone)
        for j, c in enumerate(alive):
            v = float(sc[u].importance[j])
            key = ((v / saved, -saved) if v > 0 else (v * saved, -saved), res.units.index(u), c)
            best = min(best or (key, u, c), (key, u, c))
    r1 = res.trajectory[1].removed[0]
    assert (r1.unit, r1.channel) == (best[1], best[2])


def test_stop_and_resume_give_the_same_result_and_it_saves(tmp_path, lenet, lenet_split):
    score, hold = lenet_split
    kw = dict(eval_data=hold, flops_target=0.85, per_round=1, score_images=100)
    full = compress_global(lenet, "all", score, **kw)

    class StopAfter:
        def __init__(self, n):
            self.n, self.events = n, []

        def on_event(self, event):
            self.events.append(event)

        def should_stop(self):
            return len(self.events) >= self.n

    ck = tmp_path / "ck.json"
    stop = StopAfter(2)
    with pytest.raises(callbacks.Stopped):
        compress_global(lenet, "all", score, checkpoint=ck, callbacks=stop, **kw)
    assert [e.step for e in stop.events] == [1, 2] and ck.exists()
    again = compress_global(lenet, "all", score, checkpoint=ck, **kw)
    assert again.removed == full.removed
    assert [r.flops for r in again.trajectory] == [r.flops for r in full.trajectory]
    with pytest.raises(ValueError, match="belongs to a different run .*flops_target: 0.85 -> 0.8"):
        compress_global(lenet, "all", score, checkpoint=ck, **{**kw, "flops_target": 0.8})
    # the same settings on another model or other images: refused, never the old trajectory
    other = cp.surgery.copy_model(lenet)
    with torch.no_grad():
        other.fc2.bias[0] += 1e-3
    with pytest.raises(ValueError, match=r"different run \(model_state: "):
        compress_global(other, "all", score, checkpoint=ck, **kw)
    with pytest.raises(ValueError, match=r"different run \(score_data: "):
        compress_global(lenet, "all", hold, checkpoint=ck, **kw)
    out = full.save(tmp_path / "res")
    back = GlobalCompressionResult.load(out, cp.models.lenet5().train())
    assert back.removed == full.removed and back.trajectory == full.trajectory
    assert not any(m.training for m in back.model.modules())   # as the figures were measured
    x, _ = hold.batch(slice(0, 50))
    with torch.no_grad():
        assert torch.equal(back.model(x), full.model(x))


def test_max_drop_undoes_the_round_that_crosses_it(lenet, lenet_split):
    score, hold = lenet_split
    res = compress_global(lenet, ["conv2"], score, eval_data=hold, max_drop=0.0, per_round=1,
                          score_images=100)
    assert "undone" in res.stopped
    base = res.base_holdout_accuracy
    assert all(r.holdout_accuracy >= base for r in res.trajectory)


@pytest.mark.parametrize("criterion", ["random", "l1", "car"])
def test_the_same_call_after_a_finished_run_returns_its_result(lenet, lenet_split, tmp_path,
                                                               criterion):
    score, hold = lenet_split
    kw = dict(eval_data=hold, max_drop=0.02, criterion=criterion, score_images=100,
              checkpoint=tmp_path / "ck.json")
    first = compress_global(lenet, "all", score, **kw)
    again = compress_global(lenet, "all", score, **kw)
    assert first.stopped and again.stopped == first.stopped
    assert again.removed == first.removed and again.trajectory == first.trajectory


def test_max_drop_cuts_a_round_of_several_channels_to_its_longest_prefix_within(lenet, lenet_split):
    # per_round=3: the round that crosses max_drop keeps the longest prefix of its choices that
    # stays within (here none of it), rather than undoing all three
    score, hold = lenet_split
    res = compress_global(lenet, "all", score, eval_data=hold, per_round=3, score_images=100,
                          max_drop=0.01)
    base = res.base_holdout_accuracy
    assert all(r.holdout_accuracy >= 0.99 * base for r in res.trajectory)
    assert all(len(r.removed) == 3 for r in res.trajectory)
    m = re.fullmatch(r"removing the round's first (\d+) channels would take top1 from \S+ to "
                     r"(\S+), beyond the relative max_drop=0.01; round (\d+) kept the first (\d+)",
                     res.stopped)
    assert m and int(m[1]) == int(m[4]) + 1 and float(m[2]) < 0.99 * base, res.stopped
    assert int(m[3]) == len(res.trajectory) + 1


def test_max_drop_keeps_the_longest_prefix_of_a_ranking_that_is_not_rescored(lenet, lenet_split):
    # such a ranking removes its whole order in one round: max_drop must cut that order, not
    # undo it (it removed nothing before)
    score, hold = lenet_split
    order = [(r.unit, r.channel) for r in compress_global(
        lenet, "all", score, flops_target=0.01, criterion="l1").trajectory[0].removed]
    res = compress_global(lenet, "all", score, eval_data=hold, max_drop=0.02, criterion="l1")
    k = len(res.trajectory[0].removed)
    assert len(res.trajectory) == 1 and 0 < k < len(order)
    assert [(r.unit, r.channel) for r in res.trajectory[0].removed] == order[:k]
    base = res.base_holdout_accuracy
    assert res.trajectory[0].holdout_accuracy >= 0.98 * base
    assert f"first {k + 1} channels would take" in res.stopped and f"kept the first {k}" in res.stopped
    for n, within in ((k, True), (k + 1, False)):   # the cut is where max_drop says
        removed: dict = {}
        for u, c in order[:n]:
            removed.setdefault(u, []).append(c)
        acc = cp.evaluate.accuracy(cp.prune_units(lenet, removed, score.batch([0])[0]), hold)
        assert (acc >= 0.98 * base) is within


def test_static_criteria_rank_once_and_reach_the_target(resnet20, cifar_test):
    data = cifar_test.sample(40, seed=3)
    x = torch.zeros(1, 3, 32, 32)
    an = prunable_units(resnet20, x)
    # group L1 by hand for one unit: mean over its parameters of each channel's |w| sum,
    # divided by the mean over the channels
    u = an.unit("layer3.2.conv1")
    per = [resnet20.layer3[2].conv1.weight.abs().sum((1, 2, 3)),
           resnet20.layer3[2].bn1.weight.abs(), resnet20.layer3[2].bn1.bias.abs(),
           resnet20.layer3[2].conv2.weight.abs().sum((0, 2, 3))]
    ref = torch.stack(per).double().mean(0)
    ref = ref / ref.mean()
    got = importance.Magnitude(1)(resnet20, an, [u.name])[u.name]
    torch.testing.assert_close(got, ref.detach())
    for crit in ("l1", "random", "taylor"):
        res = compress_global(resnet20, "all", data, flops_target=0.8, criterion=crit)
        assert len(res.trajectory) == 1 and res.flops <= 0.8 * res.base_flops
        assert cp.count_cost(res.model, (3, 32, 32)).total_flops == res.flops


def test_bad_arguments_are_named(lenet, lenet_split):
    score, _ = lenet_split
    with pytest.raises(ValueError, match="needs flops_target .* or max_drop"):
        compress_global(lenet, "all", score)
    with pytest.raises(ValueError, match=r"flops_target is a fraction .* got 1.5"):
        compress_global(lenet, "all", score, flops_target=1.5)
    with pytest.raises(ValueError, match="'nope' is neither a unit nor a layer"):
        compress_global(lenet, ["nope"], score, flops_target=0.9)
    with pytest.raises(ValueError, match="'fc2' is neither .*the network output"):
        compress_global(lenet, ["fc2"], score, flops_target=0.9)
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        compress_global(lenet, "all", score, flops_target=0.9, criterion="l3")
    for kw, needle in ((dict(flops_target="0.5"), "flops_target must be a number or None, got '0.5'"),
                       (dict(per_round=1.5), "per_round must be an integer or None, got 1.5"),
                       (dict(min_channels=2.5), "min_channels must be an integer, got 2.5"),
                       (dict(cost_aware="no"), "cost_aware must be True or False, got 'no'"),
                       (dict(seed="x"), "seed must be an integer, got 'x'")):
        with pytest.raises(TypeError, match=needle):
            compress_global(lenet, "all", score, **{"flops_target": 0.9, **kw})
    with pytest.raises(ValueError, match="eval_images must be >= 1 .*got 0"):
        compress_global(lenet, "all", score, flops_target=0.9, eval_images=0)


def test_ordinary_ops_and_declared_ops_have_channel_rules(lenet_split):
    # division by a number, a spatial mean as pooling, squeeze, relu_, a registered Python
    # function and a registered leaf: units are found, pruning equals masking, FLOPs fall
    def hswish_like(x):
        return x * F.relu6(x + 3) / 6

    class Opaque(torch.nn.Module):   # a leaf that mixes channels: declared, so no error
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.mix(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 6, 3)
            self.b = torch.nn.Conv2d(6, 8, 3)
            self.leaf = Opaque()
            self.c = torch.nn.Conv2d(8, 12, 3)
            self.fc = torch.nn.Linear(12, 10)

        def forward(self, x):
            x = torch.relu_(self.a(x / 255))
            x = self.leaf(hswish_like((self.b(x) + 1.0) / 2))
            x = self.c(x).relu_()
            return self.fc(x.mean((2, 3), keepdim=True).squeeze(-1).squeeze(2))

    cp.register_channelwise(hswish_like, keeps_zero=True)
    cp.register_leaf(Opaque)
    m = Net().double().eval()
    score, _ = lenet_split
    x = score.batch(slice(0, 4))[0].double()
    an = prunable_units(m, x)
    assert [u.name for u in an] == ["a", "c"]     # b's channels go into the leaf
    assert "a leaf that mixes channels" in dict(an.skipped)["b"]
    removed = {"a": [1], "c": [2, 7]}
    pruned = cp.prune_units(m, removed, analysis=an)
    torch.testing.assert_close(pruned(x), cp.units.masked_forward(an, x, removed), rtol=0,
                               atol=1e-10)
    assert cp.count_cost(pruned, (1, 28, 28)).total_flops == an.cost(removed)[0] < an.cost()[0]


def test_compress_layers_runs_in_sequence(lenet, lenet_split):
    score, _ = lenet_split
    seq = compress_layers(lenet, ["conv1", "conv2"], score, keep=0.5, progress=False)
    assert seq[1].model.conv1.out_channels == 10 and seq[1].model.conv2.out_channels == 25


@pytest.mark.parametrize("per_round", [1, 2])
def test_the_search_makes_the_same_choices_as_full_scoring(resnet20, cifar_test, per_round):
    data = cifar_test.sample(90, seed=4)
    kw = dict(flops_target=0.96, per_round=per_round)
    units = ["layer1.2.conv1", "layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1",
             "layer3.1.conv1", "layer3.0.conv2"]
    full = compress_global(resnet20, units, data, search=False, **kw)
    fast = compress_global(resnet20, units, data, **kw)
    assert len(full.trajectory) >= 3
    assert [[(c.unit, c.channel, c.importance, c.flops_saved) for c in r.removed]
            for r in fast.trajectory] == \
        [[(c.unit, c.channel, c.importance, c.flops_saved) for c in r.removed]
         for r in full.trajectory]
    assert sum(r.image_ablations for r in fast.trajectory) < \
        sum(r.image_ablations for r in full.trajectory)
