"""fill.shard: one item shard of a model answers a user block's top-k over its items with
global ids; W shards merged with merge_topk equal the float64 brute force over the whole
catalogue bit for bit (tests/reference.py), on ragged and empty shards, seen excluded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import assert_topk_exact, dyadic, random_csr, topk_reference
from svdfill.fill.shard import ItemShard, csr_restrict
from svdfill.kernels.fill import csr_take, merge_topk

U, I, D, K = 37, 23, 5, 6
FULL_USER = 7  # has seen every item


def dyadic_state(seed: int = 0) -> dict:
    """Small-integer factors and quarter biases: every float32 score is exact, so shard
    scores equal the float64 reference whatever the GEMM shapes."""
    g = torch.Generator().manual_seed(seed)
    return {"user_factors": dyadic((U, D), g, scale=1, lo=-2, hi=3),
            "item_factors": dyadic((I, D), g, scale=1, lo=-2, hi=3),
            "user_bias": dyadic((U,), g), "item_bias": dyadic((I,), g), "global_mean": torch.tensor(3.5)}


def seen_csr(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return random_csr(U, I, torch.Generator().manual_seed(seed), full_rows=(FULL_USER,), empty_rows=(3,))


def oracle(state, rows, k, seen):
    """The float64 brute force over the whole catalogue for users ``rows``: (scores, items)."""
    sub = None if seen is None else csr_take(seen[0], seen[1], rows)
    return topk_reference(state["user_factors"][rows], state["item_factors"], state["user_bias"][rows],
                          state["item_bias"], float(state["global_mean"]), k, sub)[:2]


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    return torch.device("cpu") if request.param == "cpu" else request.getfixturevalue("cuda")


@pytest.mark.parametrize("shards", [[(0, 23)], [(0, 4), (4, 15), (15, 23)], [(0, 1), (1, 22), (22, 23)],
                                    [(0, 10), (10, 10), (10, 23)]])
@pytest.mark.parametrize("with_seen", [True, False])
def test_shards_merge_to_the_one_process_fill(shards, with_seen, device):
    st = dyadic_state()
    seen = seen_csr() if with_seen else None
    rows = torch.tensor([5, 0, 36, 17, 14, FULL_USER, 3], dtype=torch.int64)  # any order
    ref = oracle(st, rows, K, seen)
    parts = []
    for lo, hi in shards:
        sh = ItemShard(st, (lo, hi), k=K, seen=seen, device=device)
        s, i = sh.topk(rows)
        assert s.device.type == device.type and s.dtype == torch.float32 and i.dtype == torch.int64
        assert s.shape == i.shape == (len(rows), K)
        assert ((i == -1) | ((i >= lo) & (i < hi))).all()  # global ids, own shard only
        parts.append((s.cpu(), i.cpu()))
    assert_topk_exact(merge_topk(parts, K), ref)


def test_empty_shard_answers_padding_only():
    st = dyadic_state()
    sh = ItemShard(st, (9, 9), k=4, seen=seen_csr())
    s, i = sh.topk(torch.arange(U))
    assert s.shape == (U, 4)
    assert (i == -1).all() and torch.isinf(s).all() and (s < 0).all()


def test_seen_items_are_excluded_per_shard():
    st = dyadic_state()
    seen = seen_csr()
    rows = torch.arange(U)
    for lo, hi in [(0, 8), (8, 23)]:
        s, i = ItemShard(st, (lo, hi), k=hi - lo, seen=seen).topk(rows)
        for u in range(U):
            had = set(seen[1][int(seen[0][u]):int(seen[0][u + 1])].tolist())
            got = [x for x in i[u].tolist() if x >= 0]
            unseen = [x for x in range(lo, hi) if x not in had]
            assert sorted(got) == unseen  # k = shard size: exactly the unseen items of the shard
        assert (i[FULL_USER] == -1).all()


def test_numpy_object_store_arrays_give_the_same_lists():
    """What a Ray actor receives: read-only numpy views of the whole arrays."""
    st = dyadic_state()
    seen = seen_csr()

    def ro(t):
        a = t.numpy().copy()
        a.setflags(write=False)
        return a

    np_state = {k: ro(v) for k, v in st.items()}
    rows = ro(torch.tensor([3, 1, 30, FULL_USER]))
    for shard in [(4, 15), (0, I)]:  # a part, and the whole catalogue (replicated items)
        a = ItemShard(np_state, shard, k=K, seen=(ro(seen[0]), ro(seen[1])))
        b = ItemShard(st, shard, k=K, seen=seen)
        for x, y in zip(a.topk(rows), b.topk(torch.from_numpy(rows.copy()))):
            assert torch.equal(x, y)


def test_a_whole_shard_keeps_the_seen_sets_as_given():
    """Replicated items: no restricted copy of what may be 100M seen pairs."""
    st = dyadic_state()
    ptr, idx = seen_csr()
    idx32 = idx.to(torch.int32)
    sh = ItemShard(st, (0, I), k=K, seen=(ptr, idx32))
    assert sh.whole and sh.seen[1].data_ptr() == idx32.data_ptr() and sh.seen[1].dtype == torch.int32
    rows = torch.tensor([FULL_USER, 0, 36, 3])
    assert_topk_exact(sh.topk(rows), oracle(st, rows, K, (ptr, idx)))
    assert not ItemShard(st, (0, I - 1), k=K, seen=(ptr, idx32)).whole


def test_shard_keeps_only_its_rows_and_seen_pairs():
    st = dyadic_state()
    seen = seen_csr()
    sh = ItemShard(st, (4, 15), k=K, seen=seen)
    assert torch.equal(sh.Q, st["item_factors"][4:15]) and torch.equal(sh.bi, st["item_bias"][4:15])
    assert torch.equal(sh.P, st["user_factors"]) and torch.equal(sh.bu, st["user_bias"])
    ptr, idx = sh.seen
    assert ptr.shape == (U + 1,) and int(ptr[-1]) == idx.numel()
    assert ((idx >= 0) & (idx < 11)).all()


def test_csr_restrict_makes_ids_local_and_keeps_row_order():
    indptr = np.array([0, 3, 3, 6])
    indices = np.array([1, 5, 9, 4, 5, 6], dtype=np.int32)
    ptr, idx = csr_restrict(indptr, indices, 4, 7)
    assert ptr.tolist() == [0, 1, 1, 4] and idx.tolist() == [1, 0, 1, 2]
    assert ptr.dtype == idx.dtype == torch.int64
    # tensors in, the same out
    ptr2, idx2 = csr_restrict(torch.from_numpy(indptr), torch.from_numpy(indices), 4, 7)
    assert torch.equal(ptr, ptr2) and torch.equal(idx, idx2)
    ptr3, idx3 = csr_restrict(indptr, indices, 10, 12)
    assert ptr3.tolist() == [0, 0, 0, 0] and idx3.numel() == 0
