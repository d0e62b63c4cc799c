"""data/csr.py against a brute-force set-per-user reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.data.csr import build_csr, build_csr_pair


@pytest.mark.parametrize("seed", range(6))
def test_build_csr_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n_users = int(rng.integers(1, 60))
    n_items = int(rng.integers(1, 40))
    n = int(rng.integers(0, 400))
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)  # repeats included on purpose
    dtype = [torch.int32, torch.int64][seed % 2]
    indptr, indices = build_csr(torch.tensor(users, dtype=dtype), torch.tensor(items, dtype=dtype), n_users)
    assert indptr.dtype == torch.int64 and indices.dtype == torch.int32
    assert indptr.shape == (n_users + 1,) and int(indptr[0]) == 0 and int(indptr[-1]) == indices.numel()
    for u in range(n_users):  # each row: the user's distinct items, ascending
        expect = sorted(set(items[users == u].tolist()))
        assert indices[int(indptr[u]):int(indptr[u + 1])].tolist() == expect


def test_numpy_input_and_bounds():
    indptr, indices = build_csr(np.array([2, 0, 2]), np.array([5, 1, 3]), 4, n_items=6)
    assert indptr.tolist() == [0, 1, 1, 3, 3] and indices.tolist() == [1, 3, 5]
    with pytest.raises(ValueError):
        build_csr(np.array([4]), np.array([0]), 4)
    with pytest.raises(ValueError):
        build_csr(np.array([0]), np.array([6]), 4, n_items=6)
    with pytest.raises(ValueError):
        build_csr(np.array([0, 1]), np.array([0]), 4)
    empty = build_csr(np.zeros(0, np.int64), np.zeros(0, np.int64), 3)
    assert empty[0].tolist() == [0, 0, 0, 0] and empty[1].numel() == 0


def test_cuda_build_equals_cpu_build(cuda):
    rng = np.random.default_rng(7)
    users, items = rng.integers(0, 300, 5000), rng.integers(0, 90, 5000)
    want = build_csr(users, items, 301)
    got = build_csr(torch.tensor(users, device=cuda), torch.tensor(items), 301, device=cuda)
    assert got[0].device.type == "cpu" and got[1].device.type == "cpu"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    empty = build_csr(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, device=cuda)
    assert empty[0].tolist() == [0, 0, 0, 0]


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("seed", range(6))
def test_csr_pair_is_two_builds_from_one_sort(seed):
    """(CSR of A, CSR of A ∪ B) equal two build_csr calls: ragged sizes, repeats inside A,
    pairs in both A and B, and empty A or B."""
    rng = np.random.default_rng(100 + seed)
    n_users, n_items = int(rng.integers(1, 50)), int(rng.integers(1, 30))
    n_a = [0, 1, 37, 300, 300, 5][seed]
    n_b = [20, 0, 5, 300, 0, 200][seed]
    ua, ia = rng.integers(0, n_users, n_a), rng.integers(0, n_items, n_a)
    ub, ib = rng.integers(0, n_users, n_b), rng.integers(0, n_items, n_b)
    if n_a and n_b:  # some pairs in both
        ub[:3], ib[:3] = ua[:3], ia[:3]
    first, both = build_csr_pair(ua, ia, ub, ib, n_users, n_items=n_items)
    assert _same(first, build_csr(ua, ia, n_users))
    assert _same(both, build_csr(np.concatenate([ua, ub]), np.concatenate([ia, ib]), n_users))
    with pytest.raises(ValueError):
        build_csr_pair(ua, ia, np.array([n_users]), np.array([0]), n_users)


def test_cuda_csr_pair_equals_cpu(cuda):
    rng = np.random.default_rng(8)
    ua, ia = rng.integers(0, 300, 5000), rng.integers(0, 90, 5000)
    ub, ib = rng.integers(0, 300, 700), rng.integers(0, 90, 700)
    want = build_csr_pair(ua, ia, ub, ib, 301)
    got = build_csr_pair(torch.tensor(ua, device=cuda), ia, ub, torch.tensor(ib, device=cuda), 301, device=cuda)
    assert got[0][0].device.type == "cpu" and _same(got[0], want[0]) and _same(got[1], want[1])


def test_keys_that_overflow_int64_are_refused():
    """Keys pack user << item-bits | item (plus a tag bit for the pair): ids too wide for
    one int64 are an error, not silently wrapped rows."""
    with pytest.raises(ValueError, match="do not fit one int64 key"):
        build_csr(np.array([2**40]), np.array([2**30]), 2**40 + 1)
    with pytest.raises(ValueError, match="do not fit one int64 key"):
        build_csr_pair(np.array([0]), np.array([0]), np.array([2**33]), np.array([2**29]), 2**33 + 1)
    indptr, indices = build_csr(np.array([3]), np.array([2**31 - 1]), 4)
    assert indptr.tolist() == [0, 0, 0, 0, 1] and indices.tolist() == [2**31 - 1]


@pytest.mark.parametrize("seed", range(4))
def test_inputs_in_user_order_take_the_merge_path_with_the_same_result(seed):
    """Ratings grouped by user in id order (MovieLens-1M's file, the synthetic generator,
    either one's train/val split) are sorted runs, merged instead of sorted: the CSRs equal
    those of the same pairs shuffled, repeats included."""
    rng = np.random.default_rng(300 + seed)
    n_users, n_items = int(rng.integers(1, 40)), int(rng.integers(1, 25))

    def sorted_pairs(n):
        u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
        o = np.lexsort((i, u))
        return u[o], i[o]
    ua, ia = sorted_pairs([0, 1, 200, 500][seed])
    ub, ib = sorted_pairs([30, 0, 50, 500][seed])
    pa, pb = rng.permutation(ua.size), rng.permutation(ub.size)
    assert _same(build_csr(ua, ia, n_users), build_csr(ua[pa], ia[pa], n_users))
    got = build_csr_pair(ua, ia, ub, ib, n_users)
    want = build_csr_pair(ua[pa], ia[pa], ub[pb], ib[pb], n_users)
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert _same(got[1], build_csr(np.concatenate([ua, ub]), np.concatenate([ia, ib]), n_users))
