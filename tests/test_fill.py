"""The fill contract (kernels.fill.fill_topk, its torch tiles, and
kernels.triton_fill.fill_topk_triton) against the float64 brute force of tests/reference.py,
plus what only the torch tiles have (tile sizes, bf16/tf32 GEMMs, score_dense).

Contract tests run once per implementation and device (:data:`IMPLS`, in the manner of
implicit's RecommenderBaseTestMixin): the torch tiles on CPU, the Triton kernel through its
interpreter on CPU, and both on CUDA (skipped without a GPU). Dyadic inputs (small integers,
biases in halves) make every float32 score exact, so each must equal the reference bit for
bit, ties included — and such inputs are full of ties. Gaussian inputs check the tiles with
a float tolerance (the fused kernel's tolerances: test_triton_fill.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

from reference import assert_topk_exact, csr_from_mask, random_csr, rounding_tie_inputs, topk_reference
from svdfill.kernels import fill as F
from svdfill.kernels.fill import fill_topk, merge_topk, score_dense

# --------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    """One fill implementation on one device: ``fill(P, Q, bu, bi, mu, k, seen, **opts)``
    with inputs moved to ``device``; ``tilings`` = option sets that must not change results."""

    name: str
    device: torch.device
    fn: Callable
    tilings: list = field(default_factory=lambda: [{}])
    slow: bool = False  # Triton's interpreter: big shapes with its default tiling only

    def fill(self, P, Q, bu, bi, mu, k, seen=None, **opts):
        P, Q, bu, bi = (t.to(self.device) for t in (P, Q, bu, bi))
        if seen is not None:
            seen = (seen[0].to(self.device), seen[1].to(self.device))
        out = self.fn(P, Q, bu, bi, mu, k, seen, **opts)
        assert out[0].device.type == self.device.type and out[1].device.type == self.device.type
        return out


TORCH_TILINGS = [{}, dict(user_block=1, item_tile=1), dict(user_block=5, item_tile=7),
                 dict(user_block=16, item_tile=32), dict(user_block=4, item_tile=10_000)]
TRITON_TILINGS = [{}, dict(block_u=16, block_i=16, n_chunks=3), dict(block_u=32, block_i=32)]

IMPLS = ["torch-cpu", "triton-interpret-cpu", "torch-cuda", "triton-cuda"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> Impl:
    name = request.param
    kernel, device = name.split("-")[0], name.split("-")[-1]
    if device == "cuda":
        dev = request.getfixturevalue("cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        dev = torch.device("cpu")
    if kernel == "torch":
        monkeypatch.setenv("SVDFILL_FILL_KERNEL", "torch")  # the tiles, also on CUDA
        return Impl(name, dev, fill_topk, TORCH_TILINGS)
    pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]')")
    from svdfill.kernels.triton_fill import fill_topk_triton

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return Impl(name, dev, fill_topk_triton, TRITON_TILINGS, slow=device == "cpu")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """For the torch-only tests: cpu, and cuda where there is one."""
    if request.param == "cuda":
        return request.getfixturevalue("cuda")
    return torch.device("cpu")


def make_inputs(rng, n_users, n_items, d=5, *, dyadic=True, seen_p=0.3, full_users=(), empty_users=()):
    """(P, Q, bu, bi, mu, seen CSR, mask) — dyadic (exact in float32) or Gaussian."""
    if dyadic:
        P = rng.integers(-2, 3, size=(n_users, d)).astype(np.float32)
        Q = rng.integers(-2, 3, size=(n_items, d)).astype(np.float32)
        bu = (rng.integers(-4, 5, size=n_users) / 2).astype(np.float32)
        bi = (rng.integers(-4, 5, size=n_items) / 2).astype(np.float32)
        mu = 3.5
    else:
        P = rng.standard_normal((n_users, d)).astype(np.float32)
        Q = rng.standard_normal((n_items, d)).astype(np.float32)
        bu = rng.standard_normal(n_users).astype(np.float32) * 0.3
        bi = rng.standard_normal(n_items).astype(np.float32) * 0.3
        mu = 3.6
    mask = rng.random((n_users, n_items)) < seen_p
    for u in full_users:
        if u < n_users:
            mask[u] = True
    for u in empty_users:
        if u < n_users:
            mask[u] = False
    t = torch.from_numpy
    return t(P), t(Q), t(bu), t(bi), mu, csr_from_mask(mask), mask


def to_dev(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("n_users,n_items", [(1, 1), (7, 5), (33, 97), (50, 130), (3, 257)])
def test_exact_on_dyadic_ragged_sizes_and_tilings(impl, n_users, n_items):
    """Fresh random ragged inputs, a user who saw everything and one who saw nothing; every
    k from 1 past the catalogue; every tiling of the implementation (the interpreter: its
    default one past 1,000 pairs; test_exact_with_ties_and_seen_items has them all)."""
    tilings = impl.tilings[:1] if impl.slow and n_users * n_items > 1000 else impl.tilings
    for j, tiles in enumerate(tilings):
        rng = np.random.default_rng(n_users * 1000 + n_items + j)
        P, Q, bu, bi, mu, seen, _ = make_inputs(rng, n_users, n_items, full_users=(0,), empty_users=(1,))
        for k in sorted({1, 3, max(1, n_items // 2), n_items, n_items + 4}):
            got = impl.fill(P, Q, bu, bi, mu, k, seen, **tiles)
            assert got[0].shape == (n_users, k)
            assert_topk_exact(got, topk_reference(P, Q, bu, bi, mu, k, seen))
            if n_users:
                assert (got[1][0] == -1).all() and torch.isneginf(got[0][0]).all()


def test_exact_with_ties_and_seen_items(impl):
    """k of 1, 5 and past the catalogue on d = 13 dyadic inputs, ~1/3 of items seen."""
    g = torch.Generator().manual_seed(101)
    P, Q = torch.randint(-4, 5, (37, 13), generator=g) / 4, torch.randint(-4, 5, (101, 13), generator=g) / 4
    bu, bi = torch.randint(-4, 5, (37,), generator=g) / 8, torch.randint(-4, 5, (101,), generator=g) / 8
    seen = random_csr(37, 101, g, full_rows=(3,))
    for tiles in impl.tilings:
        for k in (1, 5, 101):
            got = impl.fill(P, Q, bu, bi, 3.5, k, seen, **tiles)
            assert_topk_exact(got, topk_reference(P, Q, bu, bi, 3.5, k, seen))
            assert (got[1][3] == -1).all() and torch.isneginf(got[0][3]).all()


def test_ties_everywhere_go_to_lower_item_id(impl):
    rng = np.random.default_rng(1)
    n_users, n_items = 40, 300
    # 3 distinct item rows only: every score is tied with ~100 others
    Q = torch.from_numpy(rng.integers(-1, 2, size=(3, 4)).astype(np.float32))[rng.integers(0, 3, n_items)]
    P = torch.from_numpy(rng.integers(-1, 2, size=(n_users, 4)).astype(np.float32))
    bu, bi = torch.zeros(n_users), torch.zeros(n_items)
    tilings = impl.tilings[:1] if impl.slow else impl.tilings
    for k in (1, 5, 64, 150, 300):
        for tiles in tilings:
            got = impl.fill(P, Q, bu, bi, 0.0, k, **tiles)
            assert_topk_exact(got, topk_reference(P, Q, bu, bi, 0.0, k))


def test_all_equal_scores_and_everything_seen(impl):
    n_users, n_items, k = 6, 20, 8
    P, Q = torch.zeros(n_users, 3), torch.zeros(n_items, 3)
    bu, bi = torch.zeros(n_users), torch.zeros(n_items)
    # user 0 saw everything, user 1 all but items 19 and 4, others nothing
    rows = [list(range(n_items)), [i for i in range(n_items) if i not in (4, 19)]] + [[]] * 4
    indptr = torch.tensor([0] + list(np.cumsum([len(r) for r in rows])), dtype=torch.int64)
    indices = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
    s, i = impl.fill(P, Q, bu, bi, 1.0, k, (indptr, indices))
    assert (i[0] == -1).all() and torch.isneginf(s[0]).all()
    assert i[1].tolist() == [4, 19] + [-1] * 6
    assert i[2].tolist() == list(range(k))
    assert (s[2:] == 1.0).all()
    assert_topk_exact((s, i), topk_reference(P, Q, bu, bi, 1.0, k, (indptr, indices)))


def test_k_larger_than_unseen_items_pads(impl):
    g = torch.Generator().manual_seed(7)
    P, Q = torch.randint(-4, 5, (19, 5), generator=g) / 4, torch.randint(-4, 5, (23, 5), generator=g) / 4
    bu, bi = torch.randint(-4, 5, (19,), generator=g) / 8, torch.randint(-4, 5, (23,), generator=g) / 8
    seen = random_csr(19, 23, g, full_rows=(3,))
    got = impl.fill(P, Q, bu, bi, 3.5, 30, seen)
    assert_topk_exact(got, topk_reference(P, Q, bu, bi, 3.5, 30, seen))
    assert (got[1][:, 23:] == -1).all()


def test_empty_inputs(impl):
    """No users, no items: shapes right, all padding."""
    P, Q = torch.zeros(0, 4), torch.zeros(6, 4)
    s, i = impl.fill(P, Q, torch.zeros(0), torch.zeros(6), 1.0, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = impl.fill(torch.ones(5, 4), torch.zeros(0, 4), torch.zeros(5), torch.zeros(0), 1.0, 3)
    assert (i == -1).all() and torch.isneginf(s).all() and s.shape == (5, 3)


def test_item_offset_without_seen(impl):
    g = torch.Generator().manual_seed(3)
    P, Q = torch.randint(-4, 5, (21, 16), generator=g) / 4, torch.randint(-4, 5, (70, 16), generator=g) / 4
    bu, bi = torch.randint(-4, 5, (21,), generator=g) / 8, torch.randint(-4, 5, (70,), generator=g) / 8
    got = impl.fill(P, Q, bu, bi, 3.5, 7, None, item_offset=1000)
    assert_topk_exact(got, topk_reference(P, Q, bu, bi, 3.5, 7), item_offset=1000)


def test_merge_of_item_shards_equals_the_whole(impl):
    rng = np.random.default_rng(6)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 45, 230, full_users=(2,))
    k = 17
    whole = impl.fill(P, Q, bu, bi, mu, k, seen)
    assert_topk_exact(whole, topk_reference(P, Q, bu, bi, mu, k, seen))
    parts = []
    for lo, hi in [(0, 50), (50, 51), (51, 180), (180, 230)]:
        shard_seen = csr_from_mask(mask[:, lo:hi])
        parts.append(impl.fill(P, Q[lo:hi], bu, bi[lo:hi], mu, k, shard_seen, item_offset=lo))
    # shards in any order give the same answer
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = merge_topk([parts[j] for j in order])
        assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])


def test_ties_made_by_the_user_shift_follow_the_reported_scores(impl):
    """Selection on μ + b_u + b_i + p·q (float32), not on the unshifted score."""
    P, Q, bu, bi = rounding_tie_inputs()
    s, i = impl.fill(P, Q, bu, bi, 0.0, 3)
    assert s[0, 0] == s[0, 1] == 1024.25 and i[0].tolist() == [0, 1, 2]
    assert i[1].tolist() == [1, 0, 2]  # no shift: the raw order stands
    one = impl.fill(P, Q, bu, bi, 0.0, 1)
    assert one[1][:, 0].tolist() == [0, 1]  # the cut at k keeps the lower id of the tie
    # item shards merged give the same lists
    parts = [impl.fill(P, Q[lo:hi], bu, bi[lo:hi], 0.0, 3, item_offset=lo) for lo, hi in ((0, 1), (1, 3))]
    merged = merge_topk(parts)
    assert torch.equal(merged[0], s) and torch.equal(merged[1], i)


def test_negative_zero_ties_with_positive_zero(impl):
    """-0.0 and +0.0 are equal scores: the lower item must win, whatever the sign bit."""
    P = torch.tensor([[1.0], [1.0]] + [[0.0]] * 14)
    Q = torch.tensor([[-0.0], [0.0], [0.0], [-1.0]] + [[-2.0]] * 12)
    bu, bi = torch.zeros(16), torch.tensor([-0.0, 0.0, -0.0, 0.0] + [-1.0] * 12)
    got = impl.fill(P, Q, bu, bi, 0.0, 3, None)
    ref = topk_reference(P, Q, bu, bi, 0.0, 3)
    assert torch.equal(got[1].cpu(), ref[1])


# --------------------------------------------------------------------------- torch tiles only


def test_gaussian_inputs_match_float64_within_tolerance(device):
    rng = np.random.default_rng(7)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 64, 500, d=16, dyadic=False, full_users=(3,))
    k = 25
    ref_s, ref_i = (t.numpy() for t in topk_reference(P, Q, bu, bi, mu, k, seen)[:2])
    s, i = fill_topk(*to_dev(device, P, Q, bu, bi), mu, k, to_dev(device, *seen), item_tile=64)
    s, i = s.cpu().double().numpy(), i.cpu().numpy()
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-4)
    # items may differ only where two float64 scores are within float32 rounding
    diff = i != ref_i
    assert diff.mean() < 0.01
    assert np.all(np.abs(s[diff] - ref_s[diff]) < 1e-4)


def test_bfloat16_within_documented_tolerance():
    rng = np.random.default_rng(3)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 30, 200, d=8, dyadic=False)
    k = 10
    ref_s = topk_reference(P, Q, bu, bi, mu, k, seen)[0].numpy()
    s, i = fill_topk(P, Q, bu, bi, mu, k, seen, dtype="bfloat16")
    full = (P.double() @ Q.double().T + bi.double() + bu.double()[:, None] + mu).numpy()
    tol = 2.0**-8 * ((P.abs().double() @ Q.abs().double().T).numpy() + np.abs(bi.numpy())[None, :])
    kth = ref_s[:, k - 1]
    for u in range(30):
        items = i[u].numpy()
        assert not mask[u, items].any()
        # every chosen item is within tolerance of the true k-th best unseen score
        assert np.all(full[u, items] >= kth[u] - 2 * tol[u, items] - 1e-6)
        np.testing.assert_allclose(s[u].numpy(), full[u, items], atol=4 * tol[u, items].max() + 1e-5)


def test_bfloat16_scores_are_fp32_sums_of_exact_products(device):
    """The torch tiles' bf16 GEMM: bf16 inputs, their products summed and returned in fp32
    (as the fused kernel does), not rounded to bf16 — a bf16 result would tie most rows'
    k-th and (k+1)-th scores on a wide tile. Equal to float64 on the rounded inputs up to
    fp32 summation; on CUDA through ``torch.mm(out_dtype=)`` where torch has it."""
    g = torch.Generator().manual_seed(8)
    pu = torch.randn(37, 65, generator=g).to(torch.bfloat16).to(device)
    qt = torch.randn(65, 301, generator=g).to(torch.bfloat16).to(device)
    got = F._scores(pu, qt)
    assert got.dtype == torch.float32 and got.shape == (37, 301)
    want = pu.double().cpu() @ qt.double().cpu()
    err = (got.double().cpu() - want).abs()
    bound = pu.shape[1] * 2.0**-24 * (pu.double().abs().cpu() @ qt.double().abs().cpu())  # fp32 sums
    assert bool((err <= bound).all()), float((err / bound).max())
    # bf16-rounded sums would miss by up to 2⁻⁹ of each score
    assert float(err.max()) < 1e-3 * float(want.abs().mean())


def test_tf32_equals_float32_on_cpu():
    rng = np.random.default_rng(4)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 20, 90)
    a = fill_topk(P, Q, bu, bi, mu, 7, seen, dtype="tf32")
    b = fill_topk(P, Q, bu, bi, mu, 7, seen)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_memory_budget_tiles_and_item_offset(device):
    rng = np.random.default_rng(5)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 300, 700)
    k = 12
    # 1 MiB -> 65,536 cells: the whole catalogue with blocks of ~93 users
    got = fill_topk(*to_dev(device, P, Q, bu, bi), mu, k, to_dev(device, *seen), memory_budget=1 << 20,
                    item_offset=1000)
    assert_topk_exact(got, topk_reference(P, Q, bu, bi, mu, k, seen), item_offset=1000)


@pytest.mark.parametrize("n_users,n_items,k", [(613, 1003, 100), (97, 3001, 100), (41, 257, 200)])
def test_cpu_threshold_selection_exact_on_wide_catalogues(n_users, n_items, k):
    """The CPU path (threshold from group maxima, numpy sort) on catalogues wide enough to
    use it, dyadic inputs full of ties, users who saw everything, nothing, or all but fewer
    than k items; default blocks and cache-sized ones, against the float64 brute force."""
    rng = np.random.default_rng(n_users + n_items)
    P, Q, bu, bi, mu, _, mask = make_inputs(rng, n_users, n_items, d=6, seen_p=0.2,
                                            full_users=(0,), empty_users=(1,))
    mask[2] = True
    mask[2, rng.choice(n_items, k // 2, replace=False)] = False  # fewer unseen items than k
    seen = csr_from_mask(mask)
    want = topk_reference(P, Q, bu, bi, mu, k, seen)
    for opts in ({}, dict(user_block=64), dict(memory_budget=1 << 20)):
        assert_topk_exact(fill_topk(P, Q, bu, bi, mu, k, seen, **opts), want)
    assert_topk_exact(fill_topk(P, Q, bu, bi, mu, n_items + 3, seen),
                      topk_reference(P, Q, bu, bi, mu, n_items + 3, seen))


def test_cpu_selection_equals_the_torch_tiles_on_gaussian_scores():
    """Gaussian scores (ties only by rounding): select_topk (numpy threshold path, rows
    split over threads) returns tile_topk's values and items bit for bit, and the fill does
    not depend on the user blocking (a one-row last block included)."""
    from svdfill.kernels.topk import tile_topk

    g = torch.Generator().manual_seed(11)
    s = torch.randn(1500, 2999, generator=g)
    s.view(-1)[torch.randint(0, s.numel(), (s.numel() // 10,), generator=g)] = float("-inf")
    with ThreadPoolExecutor(2) as pool:
        for k in (1, 100, 2998):
            got, want = F.select_topk(s, k, pool), tile_topk(s, k)
            # −inf entries (seen items) become padding in the fill: their order is free
            live = torch.isfinite(want[0])
            assert torch.equal(got[0], want[0]) and torch.equal(got[1][live], want[1][live])
    rng = np.random.default_rng(12)
    P, Q, bu, bi, mu, seen, _ = make_inputs(rng, 257, 1500, d=16, dyadic=False, seen_p=0.1)
    ref = fill_topk(P, Q, bu, bi, mu, 50, seen)
    for block in (2, 16, 128):  # 257 = 2·128 + 1: the last block of one row starts early
        got = fill_topk(P, Q, bu, bi, mu, 50, seen, user_block=block)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_tile_sizes_never_exceed_budget():
    for n_users, n_items, budget in [(600_000, 3000, 256 << 20), (10**6, 10**6, 40 << 30), (5, 7, 1 << 20),
                                     (100, 10**7, 1 << 20)]:
        block, tile = F.tile_sizes(n_users, n_items, 100, budget)
        assert 1 <= block <= n_users and 1 <= tile <= n_items
        assert block * tile * F.BYTES_PER_CELL <= max(budget, 400 * F.BYTES_PER_CELL * 1024)


def test_score_dense_matches_reference():
    rng = np.random.default_rng(8)
    P, Q, bu, bi, mu, *_ = make_inputs(rng, 9, 31)
    ref = P.double() @ Q.double().T + bi.double() + bu.double()[:, None] + mu
    assert torch.equal(score_dense(P, Q, bu, bi, mu).double(), ref)


def test_bad_arguments():
    P, Q = torch.zeros(3, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="k must be"):
        fill_topk(P, Q, torch.zeros(3), torch.zeros(4), 0.0, 0)
    with pytest.raises(ValueError, match="factor dims"):
        fill_topk(P, torch.zeros(4, 3), torch.zeros(3), torch.zeros(4), 0.0, 1)
    with pytest.raises(ValueError, match="indptr"):
        fill_topk(P, Q, torch.zeros(3), torch.zeros(4), 0.0, 1, (torch.zeros(2, dtype=torch.int64), torch.zeros(0)))
    with pytest.raises(ValueError, match="dtype"):
        fill_topk(P, Q, torch.zeros(3), torch.zeros(4), 0.0, 1, dtype="float16")


def test_matmul_precision_uses_the_new_api_and_restores_it():
    """torch 2.13 raises on the legacy ``allow_tf32`` read once the new ``fp32_precision``
    API was used in the process: the fill's context must use the new one, leave the
    setting as it found it, and work on a CPU build too (the flags exist without CUDA)."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    before = m.fp32_precision
    try:
        m.fp32_precision = "ieee"  # the new API, used first
        for mode, inside in (("tf32", "tf32"), ("float32", "ieee"), ("bfloat16", "ieee")):
            with F._MatmulPrecision(torch.device("cuda"), mode):
                assert m.fp32_precision == inside
            assert m.fp32_precision == "ieee"
        m.fp32_precision = "tf32"
        with F._MatmulPrecision(torch.device("cuda"), "float32"):
            assert m.fp32_precision == "ieee"
        assert m.fp32_precision == "tf32"
        with F._MatmulPrecision(torch.device("cpu"), "float32"):  # off CUDA: untouched
            assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = before
    assert m.fp32_precision == before
