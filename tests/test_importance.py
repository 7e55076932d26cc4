"""Importance objects for whole-network units (`carprune.importance`), on the pretrained
ResNet-20 and real CIFAR-10 images: `CAR.search` (the exact bound) against scoring every
channel on every image."""

from __future__ import annotations

import math

import pytest
import torch

from carprune import importance
from carprune.global_mode import rank_key
from carprune.units import prunable_units


def _picks(values, rank, units, k):
    """The first k channels by `rank`, at most one per unit (the round rule)."""
    order = sorted((rank(u, j, float(values[u][j])), u, j) for u in units
                   for j in range(len(values[u])) if not math.isnan(float(values[u][j])))
    out, seen = [], set()
    for r, u, j in order:
        if u not in seen:
            out.append((u, j, r))
            seen.add(u)
        if len(out) == k:
            break
    return out


def _ranked(model, data):
    """(analysis, unit names, rank): the run's rule, CAR per FLOP saved, ties by unit and
    channel."""
    x, _ = data.batch(slice(0, 1))
    an = prunable_units(model, x)
    units = [u.name for u in an.units]
    saved = {u: an.saved_flops(u, {}) for u in units}

    def rank(u, c, v):
        return (rank_key(v, saved[u], True), units.index(u), c)

    return an, units, rank


def _check_search(found, full, rank, units, picks) -> int:
    """The search chose what full scoring chooses, its values are full scoring's exact CAR,
    and what it dropped could not have been chosen; returns how many it dropped."""
    chosen = _picks(full, rank, units, picks)
    assert [(u, j) for u, j, _ in _picks(found, rank, units, picks)] == \
        [(u, j) for u, j, _ in chosen]
    worst = chosen[-1][2]
    dropped = 0
    for u in units:
        ok = ~found[u].isnan()
        assert torch.equal(found[u][ok], full[u][ok])
        for j in (~ok).nonzero().flatten().tolist():
            assert rank(u, j, float(full[u][j])) > worst
            dropped += 1
    return dropped


@pytest.mark.parametrize("picks", [1, 3])
def test_search_scores_less_and_chooses_what_full_scoring_chooses(resnet20, cifar_test, picks):
    data = cifar_test.sample(100, seed=3)
    an, units, rank = _ranked(resnet20, data)
    full = importance.CAR(data)(resnet20, an, units)
    car = importance.CAR(data)
    found = car.search(resnet20, an, units, rank, picks=picks)
    assert _check_search(found, full, rank, units, picks) > 0
    s = car.last_search
    assert s["pairs"] == sum(c.pairs for c in car.last_cost.units) < s["full_pairs"] == 100 * sum(
        len(full[u]) for u in units)
    assert s["recounted"] == 0   # no unit's tail disagreed with the plain forward's verdicts


def test_search_counts_wrong_images_exactly_when_the_order_misleads(resnet20, cifar_test):
    """The bound takes the images that the plain forward puts clearly right to be right in
    every unit's tail too. Margins that call every image right (|margin| + 1: the wrong images
    spread over all blocks) break that: the blocks scored show it, and the search counts each
    unit's wrong images exactly and starts again, with full scoring's choices and values."""
    data = cifar_test.sample(100, seed=3)
    an, units, rank = _ranked(resnet20, data)
    full = importance.CAR(data)(resnet20, an, units)
    car = importance.CAR(data)
    honest = car._search_margins
    car._search_margins = lambda model, sc: abs(honest(model, sc)) + 1.0
    found = car.search(resnet20, an, units, rank, picks=1)
    assert car.last_search["recounted"] == 1 and car.last_search["wrong"] == 0
    assert _check_search(found, full, rank, units, 1) > 0


def test_the_search_under_the_block_cache_equals_the_search_without(resnet20, cifar_test,
                                                                    monkeypatch):
    """`CAR.search` inside `engine.block_cache` (the default) and with CARPRUNE_BLOCK_CACHE=0:
    the same values bit for bit, NaN in the same places; the cache served most large blocks
    and is gone afterwards."""
    from carprune import _ops

    data = cifar_test.sample(100, seed=3)
    an, units, rank = _ranked(resnet20, data)
    cached = importance.CAR(data).search(resnet20, an, units, rank, picks=2)
    s = _ops._C.block_cache_stats()
    assert not s["installed"] and s["cached_bytes"] == 0
    assert s["hits"] > s["misses"] > 0       # counts since this search's install
    assert 0 < s["peak_cached_bytes"] <= s["limit_bytes"]
    monkeypatch.setenv("CARPRUNE_BLOCK_CACHE", "0")
    plain = importance.CAR(data).search(resnet20, an, units, rank, picks=2)
    assert _ops._C.block_cache_stats()["hits"] == s["hits"]   # not installed this time
    for u in units:
        assert torch.equal(cached[u].isnan(), plain[u].isnan())
        ok = ~plain[u].isnan()
        assert torch.equal(cached[u][ok], plain[u][ok])


def test_kept_buffers_are_reused_and_change_no_value(resnet20, cifar_test):
    """`search(..., keep_buffers=True)` hands the next search the last one's large tensors, as
    they are (here filled with NaN): on the full network and then on one with a layer1 channel
    and a layer3 channel removed (some shapes change, most do not), every value equals that of
    a search without buffers, NaNs in the same places."""
    import carprune as cp

    data = cifar_test.sample(100, seed=3)
    x, _ = data.batch(slice(0, 1))
    an = prunable_units(resnet20, x)
    pruned = cp.prune_units(resnet20, {"layer1.1.conv1": [4], "layer3.0.conv1": [7]}, x,
                            analysis=an).eval()
    car = importance.CAR(data)
    for model in (resnet20, pruned):
        an, units, rank = _ranked(model, data)
        ref = importance.CAR(data)
        fresh = ref.search(model, an, units, rank)
        kept = car.search(model, an, units, rank, keep_buffers=True)
        for u in units:
            assert torch.equal(kept[u].nan_to_num(-7.0), fresh[u].nan_to_num(-7.0)), u
        # the same pairs run (an image's channels are skipped where its kept `a` is zero)
        assert [(c.unit, c.pairs, c.pairs_run) for c in car.last_cost.units] == \
            [(c.unit, c.pairs, c.pairs_run) for c in ref.last_cost.units]
        for t in (t for ts in car._buffers._free.values() for t in ts):
            t.fill_(float("nan"))   # what the next search must overwrite wherever it reads
    free = car._buffers._free
    assert sum(len(v) for v in free.values()) >= 5   # the kept prefix and Zs, for the next one
    car.release_buffers()
    assert car._buffers is None


def test_buffer_pool_hands_back_what_it_took_back():
    from carprune.engine import BufferPool

    pool = BufferPool()
    cpu = torch.device("cpu")
    a = pool.empty((4, 3, 8, 8), dtype=torch.float32, device=cpu,
                   memory_format=torch.channels_last)
    b = pool.empty((4, 3, 8, 8), dtype=torch.float32, device=cpu)
    assert a.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous(
        memory_format=torch.channels_last) and a.data_ptr() != b.data_ptr()
    pool.reclaim()
    # the same key gets the same storage back; another format or shape does not
    assert pool.empty((4, 3, 8, 8), dtype=torch.float32, device=cpu,
                      memory_format=torch.channels_last).data_ptr() == a.data_ptr()
    assert pool.empty((4, 3, 8, 9), dtype=torch.float32, device=cpu).data_ptr() not in (
        a.data_ptr(), b.data_ptr())
    pool.reclaim()   # b was not asked for again: let go of
    assert sum(len(v) for v in pool._free.values()) == 2
    assert all(t.data_ptr() != b.data_ptr() for v in pool._free.values() for t in v)


def test_promotion_tightens_the_threshold_exactly(resnet20, cifar_test):
    """On these 300 images the first estimate picks leaders whose best exact value is a weak
    threshold (141 channels are scored to the end without promotion): promoting the most
    promising channel before a block halves the work and changes nothing chosen."""
    data = cifar_test.sample(300, seed=0)
    an, units, rank = _ranked(resnet20, data)
    full = importance.CAR(data)(resnet20, an, units)
    runs = {}
    for promote in (0, 3):
        car = importance.CAR(data)
        found = car.search(resnet20, an, units, rank, picks=1, promote=promote)
        _check_search(found, full, rank, units, 1)
        runs[promote] = car.last_search
    assert runs[0]["promoted"] == 0 and runs[3]["promoted"] >= 1
    assert runs[3]["exact"] < runs[0]["exact"] / 10
    assert runs[3]["pairs"] < 0.6 * runs[0]["pairs"]


def test_search_without_a_count_metric_scores_everything(lenet, mnist_test):
    data = mnist_test.sample(60, seed=0)
    x, _ = data.batch(slice(0, 1))
    an = prunable_units(lenet, x)
    units = [u.name for u in an.units]
    car = importance.CAR(data, metric="nll")
    found = car.search(lenet, an, units, lambda u, c, v: (v, c), picks=1)
    full = importance.CAR(data, metric="nll")(lenet, an, units)
    for u in units:
        assert torch.equal(found[u], full[u])
