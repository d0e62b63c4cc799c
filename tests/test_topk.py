"""kernels.topk: the tie rule's pieces — exact per-tile top-k (prefilter included),
shard merging, unique keys (−0.0 = +0.0) — and the CSR slicing of seen sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.kernels.topk import (csr_slice, csr_take, exact_topk_cols, group_size, merge_topk,
                                  order_by_score_then_item, seen_by_tile, tile_topk)


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
