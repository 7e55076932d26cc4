"""Unit scoring through the engine (`carprune.unit_engine`) against the masked-forward reference.

The reference is `units.masked_forward` in float64: the traced network run once per removed
channel, the channel zeroed at every mask site of its unit (and the `removed` channels of other
units at theirs), predictions counted per class. The scorer must give exactly those counts in
float64 on the pretrained ResNet-20 and real CIFAR-10 test images, by every path (the masked
tail of coupled units, the layer's fused kernels for plain filter units), with and without the
zero-activation savings, alone and through `score_units`' shared prefix.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calibrated_torchvision
from torch import nn

import carprune as cp
from carprune import units as U
from carprune.unit_engine import UnitScorer, UnitScores, UnitScoring, _mask_channels, score_units


def reference(model, x, y, unit, channels, removed=None, k=10):
    """(counts [len(channels), k], base [k]) from units.masked_forward in float64."""
    m64 = copy.deepcopy(model).double()
    an = U.prunable_units(m64, x[:1].double())
    removed = {u: list(c) for u, c in (removed or {}).items()}
    rows = []
    for c in channels:
        rem = dict(removed)
        rem[unit] = removed.get(unit, []) + [c]
        pred = U.masked_forward(an, x.double(), rem).argmax(1)
        rows.append(torch.bincount(y[pred == y], minlength=k))
    pred = U.masked_forward(an, x.double(), removed).argmax(1)
    return torch.stack(rows), torch.bincount(y[pred == y], minlength=k)


@pytest.fixture(scope="module")
def data64(cifar_test):
    return cifar_test.sample(64, seed=11)


@pytest.fixture(scope="module")
def analysis(resnet20):
    return U.prunable_units(resnet20, torch.zeros(1, 3, 32, 32))


# conv1: the stem's residual stream (10 producers, sites in every stage, the classifier's input
# included); layer2.0.conv2: the stage-2 stream; layer1.0.conv1 a filter unit (the layer's
# fused ablate_conv path); layer3.2.conv1 a filter unit whose tail is the fused ending
@pytest.mark.parametrize("unit, channels, path", [
    ("conv1", [0, 7, 15], "masked"),
    ("layer2.0.conv2", [0, 9, 15], "masked"),
    ("layer1.0.conv1", [0, 5, 15], "fused"),
    ("layer3.2.conv1", [0, 7, 63], "head"),
])
def test_resnet20_units_exact_in_float64(resnet20, data64, analysis, unit, channels, path):
    x, y = data64.batch(slice(None))
    ref, base = reference(resnet20, x, y, unit, channels)
    assert (ref != base).any()  # the reference is informative: some removal changes a prediction
    s = UnitScorer(resnet20, unit, data64, analysis=analysis, dtype=torch.float64,
                   progress=False)
    assert s.path == path
    got = s.score(channels)
    assert got.layer == unit and got.filters.tolist() == channels
    assert torch.equal(got.counts, ref)
    assert torch.equal(got.base_counts, base)
    assert got.class_totals.tolist() == torch.bincount(y, minlength=10).tolist()
    assert s.pairs == len(channels) * 64 and s.pairs_run <= s.pairs


def test_filter_unit_masked_path_equals_fused_path(resnet20, analysis, cifar_test):
    """fused=False sends a plain filter unit through the masked tail: same counts in float32."""
    data = cifar_test.sample(100, seed=3)
    a = UnitScorer(resnet20, "layer2.1.conv1", data, analysis=analysis, progress=False)
    b = UnitScorer(resnet20, "layer2.1.conv1", data, analysis=analysis, fused=False,
                   progress=False)
    assert (a.path, b.path) == ("fused", "masked")
    sa, sb = a.score(), b.score()
    assert torch.equal(sa.counts, sb.counts) and torch.equal(sa.base_counts, sb.base_counts)


def test_removed_channels_of_other_units_exact_in_float64(resnet20, data64, analysis):
    """The state of a global run: channels of other units (and of the unit itself) removed."""
    x, y = data64.batch(slice(None))
    removed = {"conv1": [2, 11], "layer2.0.conv2": [4], "layer3.2.conv1": [5, 6]}
    for unit, channels in [("layer2.0.conv2", [0, 15]), ("layer3.2.conv1", [0, 40]),
                           ("layer1.0.conv1", [3, 9])]:
        ref, base = reference(resnet20, x, y, unit, channels, removed)
        s = UnitScorer(resnet20, unit, data64, analysis=analysis, removed=removed,
                       dtype=torch.float64, progress=False)
        got = s.score(channels)
        assert torch.equal(got.counts, ref), unit
        assert torch.equal(got.base_counts, base), unit
        assert got.removed == removed.get(unit, [])
        assert "removed elsewhere" in s.describe()


def test_remove_then_score_exact_in_float64(resnet20, data64, analysis):
    """Greedy inside a coupled unit: removals update the cached state (activations cached)."""
    x, y = data64.batch(slice(None))
    s = UnitScorer(resnet20, "conv1", data64, analysis=analysis, dtype=torch.float64,
                   progress=False)
    s.score([0])            # fills the cache, so the removal below must invalidate it
    s.remove([3])
    s.remove([8])
    got = s.score([0, 12])
    ref, base = reference(resnet20, x, y, "conv1", [0, 12], {"conv1": [3, 8]})
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
    assert s.alive == [c for c in range(16) if c not in (3, 8)]
    with pytest.raises(ValueError, match="already removed"):
        s.remove([8])


def test_zero_skip_on_and_off_give_identical_counts(resnet20, analysis, cifar_test):
    """The zero-activation savings are exact: identical counts with them on and off (float32),
    and they do skip pairs on units whose channels are often all zero (block conv1 outputs)."""
    data = cifar_test.sample(100, seed=5)
    skipped = {}
    for unit, fused in [("layer1.2.conv1", True), ("layer1.2.conv1", False),
                        ("layer2.0.conv2", True)]:
        on = UnitScorer(resnet20, unit, data, analysis=analysis, fused=fused, progress=False)
        off = UnitScorer(resnet20, unit, data, analysis=analysis, fused=fused, zero_skip=False,
                         progress=False)
        a, b = on.score(), off.score()
        assert torch.equal(a.counts, b.counts) and torch.equal(a.base_counts, b.base_counts)
        assert off.pairs_run == off.pairs == on.pairs
        skipped[(unit, on.path)] = on.pairs - on.pairs_run
    assert skipped[("layer1.2.conv1", "fused")] == skipped[("layer1.2.conv1", "masked")] > 0


def test_zero_skip_exact_in_float64_when_pairs_are_skipped(resnet20, data64, analysis):
    x, y = data64.batch(slice(None))
    s = UnitScorer(resnet20, "layer1.2.conv1", data64, analysis=analysis, fused=False,
                   dtype=torch.float64, progress=False)
    got = s.score(list(range(16)))
    assert s.pairs_run < s.pairs
    ref, base = reference(resnet20, x, y, "layer1.2.conv1", range(16))
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)


class _Events:
    def __init__(self):
        self.seen = []

    def on_event(self, event):
        self.seen.append(event)

    def should_stop(self):
        return False


def test_score_units_equals_unit_scorers_in_float64(resnet20, analysis, cifar_test, tmp_path):
    data = cifar_test.sample(16, seed=9)
    names = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv1"]
    removed = {"layer2.0.conv2": [1], "layer3.2.conv1": [7]}
    events = _Events()
    res = score_units(resnet20, data, names, analysis=analysis, removed=removed,
                      dtype=torch.float64, memory_budget="24MiB", callbacks=events)
    assert list(res) == names
    for name in names:
        one = UnitScorer(resnet20, name, data, analysis=analysis, removed=removed,
                         dtype=torch.float64, progress=False).score()
        got = res[name]
        assert got.filters.tolist() == one.filters.tolist()
        assert torch.equal(got.counts, one.counts), name
        assert torch.equal(got.base_counts, one.base_counts), name
    assert res["layer3.2.conv1"].filters.tolist() == [f for f in range(64) if f != 7]
    # the cost model: every pair accounted for, tails cost what their modules cost
    cost = {u.unit: u for u in res.cost.units}
    assert cost["conv1"].pairs == 16 * 16 and cost["layer3.2.conv1"].pairs == 63 * 16
    assert cost["conv1"].path == "masked" and cost["layer1.0.conv1"].path == "fused"
    # the stream removal zeroes channels of the classifier's input: that ending is not the
    # plain one the fused head kernel takes, so the layer's ablate_conv path scores it
    assert cost["layer3.2.conv1"].path == "fused"
    full = cp.count_cost(resnet20, (3, 32, 32)).total_flops
    assert cost["layer3.2.conv1"].tail_macs < cost["layer2.0.conv2"].tail_macs < \
        cost["layer1.0.conv1"].tail_macs < cost["conv1"].tail_macs < full
    assert cost["layer1.0.conv1"].run_macs < cost["layer1.0.conv1"].tail_macs
    assert 0 < res.cost.prefix_macs <= full
    assert "GFLOP/s" in res.cost.describe()
    assert events.seen and events.seen[-1].algorithm == "score-units"
    # save / load without pickle
    res.save(tmp_path / "u")
    back = UnitScores.load(tmp_path / "u")
    assert list(back) == names and back.cost == res.cost
    assert torch.equal(back["conv1"].counts, res["conv1"].counts)


def test_score_units_float32_chunked_equals_one_chunk(resnet20, analysis, cifar_test):
    data = cifar_test.sample(60, seed=2)
    names = ["conv1", "layer3.0.conv2", "layer3.1.conv1"]
    a = score_units(resnet20, data, names, analysis=analysis)
    events = _Events()
    b = score_units(resnet20, data, names, analysis=analysis, memory_budget="4MiB", rows=64,
                    zero_skip=False, callbacks=events)
    assert len(events.seen) > 1   # several chunks, each one prefix pass for the three units
    for n in names:
        assert torch.equal(a[n].counts, b[n].counts) and torch.equal(a[n].base_counts,
                                                                     b[n].base_counts)


def test_kept_prefix_gives_the_counts_of_fresh_runs(resnet20, analysis, cifar_test):
    """`UnitScoring.keep`: runs on stretches of the kept order read views of one prefix pass
    and keep each unit's chunk (float32, channels_last tails) and give the counts of runs that
    compute everything afresh; other image sets still work; too small a budget keeps nothing."""
    names = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv1"]
    removed = {"conv1": [5], "layer1.0.conv1": [3], "layer2.1.conv1": [0, 9]}
    kw = dict(analysis=analysis, num_images=150, removed=removed)
    sc = UnitScoring(resnet20, cifar_test, names, **kw)
    fresh = UnitScoring(resnet20, cifar_test, names, **kw)
    order = np.random.default_rng(0).permutation(sc.indices)
    assert sc.keep(order) > 0
    nhwc = {n: v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
            for n, v in sc._kept.values.items()}
    fused_in = {s.split.live[0] for s in sc.scorers.values() if s.fused is not None}
    assert fused_in and not any(nhwc[n] for n in fused_in) and any(nhwc.values())
    chans = {"conv1": [0, 7], "layer1.0.conv1": [1, 15], "layer2.0.conv2": [4],
             "layer3.2.conv1": [2, 63]}
    blocks = [order[:40], order[40:110], order[110:], order[::3]]   # the last is no stretch
    for k, block in enumerate(blocks):
        got, ref = sc.run(block, chans), fresh.run(block, chans)
        for n in names:
            assert torch.equal(got[n].counts, ref[n].counts), (k, n)
            assert torch.equal(got[n].base_counts, ref[n].base_counts), (k, n)
        if k < 3:
            assert got.cost.prefix_seconds < ref.cost.prefix_seconds
    assert set(sc._kept.chunks) == set(names)
    # the unablated outputs found by the runs are kept for later ones (zero-skip)
    assert bool(sc._kept.chunks["conv1"].known.all())
    small = UnitScoring(resnet20, cifar_test, names, **{**kw, "memory_budget": "8MiB"})
    assert small.keep(order) == 0.0 and small._kept is None
    # room beside the prefix for the largest chunk alone: the smaller ones are kept instead
    # (the most units), and the counts are those of fresh runs
    n = len(order)
    by_size = sorted(names, key=lambda u: sc._chunk_bytes[u])
    assert sum(sc._chunk_bytes[u] for u in by_size[:-1]) < sc._chunk_bytes[by_size[-1]]
    half = (sc._live_bytes + sc._chunk_bytes[by_size[-1]]) * n
    part = UnitScoring(resnet20, cifar_test, names, **{**kw, "memory_budget": 2 * half + 2})
    part.keep(order)
    assert part._kept.fit == set(by_size[:-1])
    got, ref = part.run(order[40:110], chans), fresh.run(order[40:110], chans)
    assert all(torch.equal(got[u].counts, ref[u].counts) for u in names)
    assert set(part._kept.chunks) == set(by_size[:-1])
    # the channel masks inside the tails keep channels_last, zero what masked_fill zeroes and
    # leave the rest as it is (a NaN in a kept channel too)
    v = torch.randn(6, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    v[0, 4, 0, 0] = float("nan")
    drop = torch.zeros(6, 16, dtype=torch.bool)
    drop[:, 3] = True
    drop[2, 7] = True
    for x in (v, v.reshape(6, 16 * 25)):   # a [rows, channels x block] site too
        got = _mask_channels(x, drop)
        ref = x.reshape(6, 16, -1).masked_fill(drop.unsqueeze(-1), 0).reshape(x.shape)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    assert _mask_channels(v, drop).is_contiguous(memory_format=torch.channels_last)


def test_bad_input_errors(resnet20, analysis, cifar_test):
    data = cifar_test.sample(8)
    with pytest.raises(KeyError, match="no unit 'layer9'"):
        UnitScorer(resnet20, "layer9", data, analysis=analysis)
    with pytest.raises(ValueError, match=r"channels \[16\] are out of range for unit 'conv1'"):
        UnitScorer(resnet20, "layer1.0.conv1", data, analysis=analysis, removed={"conv1": [16]})
    with pytest.raises(ValueError, match="every channel of unit 'conv1' is removed"):
        score_units(resnet20, data, ["layer1.0.conv1"], analysis=analysis,
                    removed={"conv1": range(16)})
    other = U.prunable_units(_tiny(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="the analysis does not belong to this"):
        UnitScorer(resnet20, other.units[0].name, data, analysis=other)


def _tiny() -> nn.Module:
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.b(F.gelu(self.a(x))), 1).flatten(1))

    return Tiny().eval()


def test_describe_names_sites_and_path(resnet20, analysis, cifar_test):
    data = cifar_test.sample(8)
    s = UnitScorer(resnet20, "conv1", data, analysis=analysis, progress=False)
    d = s.describe()
    assert "unit: conv1 (coupled, 16 channels)" in d
    assert "10 sites (1 cached, 9 inside the tail)" in d and "flatten" in d
    f = UnitScorer(resnet20, "layer3.2.conv1", data, analysis=analysis, progress=False)
    assert "scored as the layer layer3.2.conv1" in f.describe()
    assert "ablate_conv_head" in f.describe()


# -- torchvision: coupled units of other architectures ------------------------------------------
@pytest.mark.torchvision
@pytest.mark.parametrize("name, unit, channels, sites", [
    # an inverted-residual stream: projection BN output and two residual adds
    ("mobilenet_v2", "features.4.conv.2", [0, 13, 31], 3),
    # a dense layer's new channels, read through concatenation by 5 later layers and the
    # transition (each after its own BatchNorm + ReLU: zeroed after them, in 6 places)
    ("densenet121", "features.denseblock1.denselayer1.conv2", [0, 17, 31], 6),
    # the stem coupled with block 1's squeeze-excite gate (the SE squeeze and the gated product)
    ("efficientnet_b0", "features.0.0", [0, 9, 31], 2),
    # an MBConv stream: projection BN output and the residual add
    ("efficientnet_b0", "features.2.0.block.3.0", [0, 23], 2),
])
def test_torchvision_units_exact_in_float64(cifar_test, name, unit, channels, sites):
    model, x, y = calibrated_torchvision(name, cifar_test)
    analysis = U.prunable_units(model, x[:1])
    u = analysis.unit(unit)
    assert len(u.mask) == sites
    ref, base = reference(model, x, y, unit, channels)
    assert (ref != base).any()
    s = UnitScorer(model, unit, (x, y), analysis=analysis, dtype=torch.float64, progress=False)
    assert s.path == "masked"
    got = s.score(channels)
    assert torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
