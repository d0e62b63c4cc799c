"""kernels.topk: the tie rule's pieces — exact per-tile top-k (prefilter included),
shard merging, unique keys (−0.0 = +0.0) — and the CSR slicing of seen sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.kernels.topk import (csr_slice, csr_take, exact_topk_cols, group_size, merge_topk,
                                  order_by_score_then_item, seen_by_tile, threshold_group, threshold_topk,
                                  tile_topk)


@pytest.mark.parametrize("levels", [3, 30, 10_000])
def test_tile_topk_prefilter_with_ties_matches_lexsort(levels):
    """The group-max prefilter path (wide rows) against a lexsort, with few to many ties."""
    rng = np.random.default_rng(levels)
    tile = torch.from_numpy(rng.integers(0, levels, (40, 1003)).astype(np.float32))
    tile[0] = 1.0  # a constant row
    tile[1, ::2] = float("-inf")
    for k in (1, 7, 60, 200):
        assert group_size(1003, k) or k == 200
        vals, cols = tile_topk(tile, k)
        for r in range(tile.shape[0]):
            order = np.lexsort((np.arange(1003), -tile[r].numpy()))[:k]
            assert cols[r].tolist() == order.tolist()
            assert vals[r].tolist() == tile[r, order].tolist()


def _lexsort_topk(tile: np.ndarray, k: int):
    """Float64 brute force: per row, columns by (value desc, column asc), the first k."""
    cols = np.stack([np.lexsort((np.arange(tile.shape[1]), -tile[r].astype(np.float64)))[:k]
                     for r in range(tile.shape[0])])
    return np.take_along_axis(tile, cols, axis=1), cols


def _assert_same(got, want):
    (gv, gc), (wv, wc) = got, want
    assert gc.dtype == np.int64 and gv.dtype == np.float32
    assert np.array_equal(gc, wc)
    # bit for bit: -0.0 stays -0.0 where the tile has it
    assert np.array_equal(gv.view(np.uint32), wv.view(np.uint32))


@pytest.mark.parametrize("levels", [2, 7, 50, None])
def test_threshold_topk_matches_lexsort_on_ragged_rows_and_ties(levels):
    """Fresh random ragged shapes, few to no ties, every k from 1 to n - 1, and against
    tile_topk (the torch selection it replaces on CPU)."""
    rng = np.random.default_rng(17 if levels is None else levels)
    for rows, n in [(1, 2), (3, 9), (17, 101), (40, 803), (9, 3001)]:
        if levels is None:
            tile = rng.standard_normal((rows, n)).astype(np.float32)
        else:
            tile = rng.integers(0, levels, (rows, n)).astype(np.float32) / 4
        for k in sorted(k for k in {1, 2, n // 9, n // 2, n - 1} if 1 <= k < n):
            got = threshold_topk(tile, k)
            _assert_same(got, _lexsort_topk(tile, k))
            tv, tc = tile_topk(torch.from_numpy(tile), k)
            assert np.array_equal(got[1], tc.numpy()) and np.array_equal(got[0], tv.numpy())


def test_threshold_topk_ties_across_the_threshold_seen_rows_and_signed_zeros():
    """Rows built so that the k-th value is tied far past k (the threshold itself is tied),
    rows all −inf (everything seen), rows with fewer finite values than k, ±0.0 ties."""
    rng = np.random.default_rng(3)
    n, k = 1200, 100
    tile = rng.standard_normal((12, n)).astype(np.float32)
    tile[0] = 1.0                                   # one tie across the whole row
    tile[1, :] = 0.5
    tile[1, rng.choice(n, 60, replace=False)] = 2.0  # k-th value tied with 1,140 others
    tile[2] = -np.inf                                # everything seen
    tile[3, 30:] = -np.inf                           # 30 finite values < k
    tile[4] = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0))
    tile[5, ::3] = -np.inf
    tile[6, :] = np.round(tile[6] * 2) / 2           # coarse levels: ties at every place
    tile[7, rng.choice(n, 150, replace=False)] = 9.0  # more entries at the max than k
    for kk in (1, k, n - 1):
        _assert_same(threshold_topk(tile, kk), _lexsort_topk(tile, kk))


def test_threshold_topk_group_width_and_arguments():
    assert threshold_group(3000, 100) == 8 and threshold_group(150, 100) == 1 and threshold_group(250, 100) == 2
    with pytest.raises(ValueError):
        threshold_topk(np.zeros((2, 5), np.float32), 5)


def test_threshold_topk_nan_rows_take_the_torch_path():
    rng = np.random.default_rng(4)
    tile = rng.standard_normal((6, 400)).astype(np.float32)
    tile[2, ::2] = np.nan  # the threshold is NaN there: no candidates compare >= it
    got = threshold_topk(tile, 20)
    want = tile_topk(torch.from_numpy(tile), 20)
    assert np.array_equal(got[1], want[1].numpy())
    ok = [r for r in range(6) if r != 2]
    _assert_same((got[0][ok], got[1][ok]), _lexsort_topk(tile[ok], 20))


def test_merge_topk_ties_padding_and_k():
    s1 = torch.tensor([[2.0, 1.0, float("-inf")]])
    i1 = torch.tensor([[9, 5, -1]])
    s2 = torch.tensor([[2.0, 1.0]])
    i2 = torch.tensor([[3, 7]])
    s, i = merge_topk([(s1, i1), (s2, i2)])
    assert i.tolist() == [[3, 9, 5]] and s.tolist() == [[2.0, 2.0, 1.0]]
    s, i = merge_topk([(s1, i1), (s2, i2)], k=6)
    assert i.tolist() == [[3, 9, 5, 7, -1, -1]]
    with pytest.raises(ValueError):
        merge_topk([])


def test_negative_zero_ties_with_zero():
    tile = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1.0]])
    cols = exact_topk_cols(tile, 2)
    assert sorted(cols[0].tolist()) == [0, 1]
    s, i = order_by_score_then_item(tile, torch.tensor([[4, 3, 2, 1, 0]]))
    assert i.tolist() == [[1, 2, 3, 4, 0]]


def test_order_puts_padding_last_among_equal_scores():
    s = torch.tensor([[float("-inf"), 1.0, float("-inf"), 1.0]])
    i = torch.tensor([[-1, 7, 5, 2]])
    s2, i2 = order_by_score_then_item(s, i)
    assert i2.tolist() == [[2, 7, 5, -1]] and s2[0, :2].tolist() == [1.0, 1.0]


def test_csr_take_reorders_rows():
    indptr = torch.tensor([0, 2, 2, 5, 6])
    indices = torch.tensor([1, 4, 0, 2, 3, 9], dtype=torch.int32)
    ptr, idx = csr_take(indptr, indices, torch.tensor([3, 0, 1, 2]))
    assert ptr.tolist() == [0, 1, 3, 3, 6] and idx.tolist() == [9, 1, 4, 0, 2, 3]
    assert idx.dtype == torch.int32


def test_csr_slice_is_a_rebased_block_of_rows():
    indptr = torch.tensor([0, 2, 2, 5, 6])
    indices = torch.tensor([1, 4, 0, 2, 3, 9], dtype=torch.int32)
    ptr, idx = csr_slice(indptr, indices, 1, 3)
    assert ptr.tolist() == [0, 0, 3] and idx.tolist() == [0, 2, 3]
    ptr, idx = csr_slice(indptr, indices, 0, 2)  # a prefix: what the auto trial takes
    assert ptr.tolist() == [0, 2, 2] and idx.tolist() == [1, 4]
    assert csr_slice(indptr, indices, 4, 4)[0].tolist() == [0]


def test_seen_by_tile_groups_entries_by_item_tile():
    rows = torch.tensor([0, 0, 1, 2, 2])
    cols = torch.tensor([9, 1, 5, 0, 8])
    r, c, bounds = seen_by_tile(rows, cols, 4, 3)
    assert bounds == [0, 2, 3, 5]
    assert c.tolist() == [1, 0, 5, 9, 8] and r.tolist() == [0, 2, 1, 0, 2]
    assert seen_by_tile(rows, cols, 10, 1)[2] == [0, 5]
