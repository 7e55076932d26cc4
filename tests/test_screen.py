"""The bfloat16 tail screen (`carprune.screen`): counts against the float32 engine on real
images, the float32 recomputation of rows in doubt, the audit that turns the screen off, and the
settings it refuses."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import carprune as cp
from carprune import graph, screen
from carprune.fold import fold_conv_bn, fuse_conv_pointwise
from carprune.unit_engine import UnitScoring

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no bfloat16 instructions "
                                "(the screen refuses to run there; see test_refusals)")


@pytest.fixture(scope="module")
def tail_and_rows(resnet20, cifar_test):
    """The whole pretrained ResNet-20 as a float32 'tail' (folded, oneDNN-fused, as the engine
    builds tails) and 256 real images as its rows."""
    gm = fuse_conv_pointwise(fold_conv_bn(graph.trace(copy.deepcopy(resnet20))))
    x, _ = cp.data.batches.load_batch(cifar_test, np.arange(256))
    return gm, x


def _topk_sets(out: torch.Tensor, k: int) -> torch.Tensor:
    return out.topk(k, dim=1).indices.sort(dim=1).values


@needs_bf16
@pytest.mark.parametrize("k", [1, 3])
def test_screen_keeps_the_float32_topk_sets(tail_and_rows, k):
    gm, x = tail_and_rows
    with torch.no_grad():
        exact = gm(x)
        s = screen.Screen(gm, k)
        got = s([x])
        fast = s.fast(x.to(torch.bfloat16)).float()
    assert s.on and s.stats.rows == 256
    assert 0 < s.stats.rechecked < 256 and s.stats.audited >= 1 and s.stats.worst < 1
    assert torch.equal(_topk_sets(got, k), _topk_sets(exact, k))
    # rows in doubt carry float32 values, trusted ones bfloat16 values
    top = fast.topk(k + 1, dim=1).values
    doubt = (top[:, k - 1] - top[:, k]) <= s.tolerance * fast.abs().amax(1)
    assert torch.allclose(got[doubt], exact[doubt], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast, exact, rtol=1e-4, atol=1e-4)   # bfloat16 does differ


@needs_bf16
def test_every_row_in_doubt_is_the_float32_tail(tail_and_rows):
    gm, x = tail_and_rows
    s = screen.Screen(gm, 1, tolerance=1e9)
    with torch.no_grad():
        got, exact = s([x[:64]]), gm(x[:64])
    assert s.stats.rechecked == 64 and s.stats.audited == 0
    assert torch.allclose(got, exact, rtol=1e-4, atol=1e-4)


@needs_bf16
def test_a_failed_audit_turns_the_screen_off(tail_and_rows, caplog):
    gm, x = tail_and_rows
    s = screen.Screen(gm, 1, tolerance=1e-7, audit_every=4)   # far below bfloat16's error
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="carprune"):
        got = s([x[:64]])
        exact = gm(x[:64])
        later = s([x[64:96]])
    assert not s.on and s.stats.worst > 1
    assert "screening is off" in caplog.text
    # the call that found it and every later call are float32 throughout
    assert torch.allclose(got, exact, rtol=1e-4, atol=1e-4)
    assert torch.allclose(later, gm(x[64:96]), rtol=1e-4, atol=1e-4)


@needs_bf16
def test_unit_counts_with_the_screen_equal_float32(resnet20, cifar_test):
    """Every path the screen serves (a stream unit's masked tail, a filter unit through the
    fused consumer, a projection's stream) on 160 real images: counts identical."""
    units = ["conv1", "layer1.0.conv1", "layer3.0.conv2"]
    an = cp.prunable_units(resnet20, torch.zeros(1, 3, 32, 32))
    plain = UnitScoring(resnet20, cifar_test, units, analysis=an, num_images=160).run()
    sc = UnitScoring(resnet20, cifar_test, units, analysis=an, num_images=160, screen="bf16")
    got = sc.run()
    assert {sc.scorers[u].path for u in units} == {"masked", "fused"}
    for u in units:
        assert torch.equal(got[u].counts, plain[u].counts), u
        assert torch.equal(got[u].base_counts, plain[u].base_counts), u
    costs = {c.unit: c for c in got.cost.units}
    assert all(0 < costs[u].rechecked < costs[u].screened for u in units)
    assert sum(c.screened for c in plain.cost.units) == 0
    assert "bfloat16 screen" in got.cost.describe(100.0)
    assert max(s.screen.stats.worst for s in sc.scorers.values()) < 1


def test_refusals(resnet20, cifar_test, monkeypatch):
    one = {"num_images": 4}
    with pytest.raises(ValueError, match="screen must be None or one of"):
        cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, screen="fp8", **one)
    with pytest.raises(ValueError, match="float64 is the reference precision"):
        cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, screen="bf16",
                       dtype=torch.float64, **one)
    with pytest.raises(ValueError, match="not a top-k count"):
        cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, screen="bf16", metric="nll", **one)
    with pytest.raises(ValueError, match="criterion is 'l1'"):
        cp.compress_global(resnet20, "all", cifar_test, flops_target=0.9, criterion="l1",
                           screen="bf16", score_images=4)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bfloat16 instructions"):
        cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, screen="bf16", **one)
