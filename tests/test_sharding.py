"""Balanced contiguous item shards: coverage, balance (vs brute force), edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from svdfill.distributed.sharding import balanced_shards, even_shards, item_counts


def _check_cover(shards, n):
    assert shards[0][0] == 0 and shards[-1][1] == n
    for (a, b), (c, d) in zip(shards, shards[1:]):
        assert b == c
    assert all(hi > lo for lo, hi in shards)


def _brute_best(counts, w):
    """Smallest possible largest-shard load over every contiguous split (tiny sizes only)."""
    n = len(counts)
    best = None
    for cuts in itertools.combinations(range(1, n), w - 1):
        bounds = (0, *cuts, n)
        load = max(sum(counts[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = load if best is None else min(best, load)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    w = int(rng.integers(1, n + 1))
    # heavy-tailed counts with zeros and ties, like item popularity
    counts = (rng.zipf(1.5, size=n) * rng.integers(0, 2, size=n)).astype(np.int64)
    shards = balanced_shards(counts, w)
    assert len(shards) == w
    _check_cover(shards, n)
    load = max(int(counts[a:b].sum()) for a, b in shards)
    assert load == _brute_best(list(counts), w)


def test_balance_on_large_skewed_counts():
    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.zipf(1.3, size=3000).clip(max=5000))
    for w in (1, 2, 3, 8):
        shards = balanced_shards(counts, w)
        _check_cover(shards, 3000)
        loads = [int(counts[a:b].sum()) for a, b in shards]
        # optimal bottleneck: never worse than the even share plus the heaviest item
        assert max(loads) <= counts.sum().item() / w + counts.max().item()


def test_even_shards():
    shards = even_shards(10, 3)
    assert shards == [(0, 4), (4, 7), (7, 10)] or [b - a for a, b in shards] in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    _check_cover(shards, 10)


def test_item_counts():
    c = item_counts(torch.tensor([0, 2, 2, 5], dtype=torch.int32), 7)
    assert c.tolist() == [1, 0, 2, 0, 0, 1, 0]


def test_errors():
    with pytest.raises(ValueError, match="non-empty"):
        balanced_shards([1, 2], 3)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_shards([1, -2], 1)
    with pytest.raises(ValueError, match="world_size"):
        balanced_shards([1, 2], 0)


def test_all_zero_counts():
    shards = balanced_shards(np.zeros(5, dtype=np.int64), 2)
    _check_cover(shards, 5)
    assert len(shards) == 2


def test_select_shard_local_ids():
    from svdfill.data.dataset import Ratings
    from svdfill.distributed.sharding import select_shard

    r = Ratings.from_arrays([0, 1, 2, 0], [4, 1, 3, 2], [1.0, 2.0, 3.0, 4.0], 3, 5)
    part = select_shard(r, 2, 5)
    assert part.n_items == 3 and part.n_users == 3
    assert part.items.tolist() == [2, 1, 0] and part.users.tolist() == [0, 2, 0]
    assert part.ratings.tolist() == [1.0, 3.0, 4.0] and part.items.dtype == r.items.dtype


def test_fill_item_shards_replicate_small_tables_and_shard_big_ones():
    from svdfill.distributed.sharding import (REPLICATE_ITEMS_MAX_BYTES, fill_item_shards,
                                              is_replicated)
    from svdfill.launch.cmd_fill import ITEM_SPLITS
    from svdfill.distributed.sharding import ITEM_SPLITS as SPLITS

    assert ITEM_SPLITS == SPLITS  # the CLI's copy (kept import-light) is the same list
    fits = REPLICATE_ITEMS_MAX_BYTES // (4 * 65)  # items of a d=64 table at the limit
    assert fill_item_shards(fits, 64, 3) == [(0, fits)] * 3
    assert is_replicated(fill_item_shards(fits, 64, 3), fits)
    assert fill_item_shards(fits + 1, 64, 3) == even_shards(fits + 1, 3)  # one item more: shards
    assert not is_replicated(fill_item_shards(fits + 1, 64, 3), fits + 1)
    assert fill_item_shards(10, 4, 2, "shard") == [(0, 5), (5, 10)]
    assert fill_item_shards(10**9, 128, 2, "replicate") == [(0, 10**9)] * 2
    assert is_replicated(fill_item_shards(10, 4, 1, "shard"), 10)  # W = 1: one whole shard
    with pytest.raises(ValueError, match="item split 'half'"):
        fill_item_shards(10, 4, 2, "half")
