"""The size-class block cache (`carprune.engine.block_cache`, csrc/block_cache.cpp) that
`CAR.search` installs as the CPU allocator: it reuses freed blocks and gives the previous
allocator back on exit (that a search under it equals one without: test_importance.py)."""

from __future__ import annotations

import pytest
import torch

from carprune import _ops
from carprune.engine import block_cache


def _stats() -> dict:
    return _ops._C.block_cache_stats()


def test_freed_blocks_are_reused_and_released_on_exit():
    assert not _stats()["installed"]
    x = torch.arange(300_000, dtype=torch.float64)
    with block_cache():
        assert _stats()["installed"]
        a = x * 2.0                       # 2.4 MB: a miss
        del a                             # back to the cache
        assert _stats()["cached_bytes"] >= 2_400_000
        b = x * 3.0                       # the same size class: a hit
        s = _stats()
        assert s["hits"] >= 1 and s["cached_bytes"] < 2_400_000
        with block_cache():               # nested: shares the outer cache
            c = x + 1.0
        assert _stats()["installed"]
        small = torch.ones(10)            # under 4 KiB: the previous allocator's
    s = _stats()
    assert not s["installed"] and s["cached_bytes"] == 0
    # tensors made inside outlive the block with their values (their memory freed later)
    ref = torch.arange(300_000, dtype=torch.float64)
    assert torch.equal(b, ref * 3.0) and torch.equal(c, ref + 1.0) and small.sum() == 10
    del b, c
    before = _stats()["misses"]
    torch.empty(1_000_000)                # the previous allocator again
    assert _stats()["misses"] == before


def test_a_zero_limit_caches_nothing_and_a_negative_one_is_refused():
    x = torch.ones(100_000)
    with block_cache(0):
        for _ in range(3):
            y = x * 2.0
            del y
        s = _stats()
        assert s["hits"] == 0 and s["cached_bytes"] == 0
    with pytest.raises(ValueError, match="limit_bytes must be >= 0, got -1"), block_cache(-1):
        pass
    assert not _stats()["installed"]
