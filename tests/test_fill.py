"""kernels.fill against a float64 brute force on fresh random inputs.

Dyadic inputs (small integers, biases in halves) make every float32 score exact, so the
fill must equal the float64 reference bit for bit, ties included — and such inputs are
full of ties. Gaussian inputs check the same code with a float tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from svdfill.kernels import fill as F
from svdfill.kernels.fill import csr_take, fill_topk, merge_topk, score_dense


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        return request.getfixturevalue("cuda")
    return torch.device("cpu")


def make_inputs(rng, n_users, n_items, d=5, *, dyadic=True, seen_p=0.3, full_users=(), empty_users=()):
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
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int32)  # row-major: sorted within rows
    t = lambda a: torch.from_numpy(a)
    return t(P), t(Q), t(bu), t(bi), mu, (t(indptr), t(indices)), mask


def brute_force(P, Q, bu, bi, mu, k, mask=None):
    """float64 reference: scores [U, k], items [U, k] (−inf / −1 padding)."""
    P64, Q64 = P.double().numpy(), Q.double().numpy()
    S = P64 @ Q64.T + bi.double().numpy()[None, :] + bu.double().numpy()[:, None] + mu
    if mask is not None:
        S[mask] = -np.inf
    n_users, n_items = S.shape
    out_s = np.full((n_users, k), -np.inf)
    out_i = np.full((n_users, k), -1, dtype=np.int64)
    items = np.arange(n_items)
    for u in range(n_users):
        order = np.lexsort((items, -S[u]))[: min(k, n_items)]  # score desc, then item asc
        live = np.isfinite(S[u, order])
        order = order[live]
        out_s[u, : len(order)] = S[u, order]
        out_i[u, : len(order)] = order
    return out_s, out_i


def to_dev(device, *ts):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


def assert_exact(got, ref):
    s, i = got
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    np.testing.assert_array_equal(i.cpu().numpy(), ref[1])
    np.testing.assert_array_equal(s.cpu().double().numpy(), ref[0])


@pytest.mark.parametrize("n_users,n_items", [(1, 1), (7, 5), (33, 97), (50, 130), (3, 257)])
@pytest.mark.parametrize("tiles", [(None, None), (1, 1), (5, 7), (16, 32), (4, 10_000)])
def test_exact_on_dyadic_ragged_sizes_and_tiles(device, n_users, n_items, tiles):
    rng = np.random.default_rng(n_users * 1000 + n_items + (tiles[0] or 0))
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, n_users, n_items, full_users=(0,), empty_users=(1,))
    for k in sorted({1, 3, max(1, n_items // 2), n_items, n_items + 4}):
        ref = brute_force(P, Q, bu, bi, mu, k, mask)
        got = fill_topk(*to_dev(device, P, Q, bu, bi), mu, k, to_dev(device, *seen),
                        user_block=tiles[0], item_tile=tiles[1])
        assert got[0].device.type == device.type
        assert_exact(got, ref)


def test_ties_everywhere_go_to_lower_item_id(device):
    rng = np.random.default_rng(1)
    n_users, n_items = 40, 300
    # 3 distinct item rows only: every score is tied with ~100 others
    Q = torch.from_numpy(rng.integers(-1, 2, size=(3, 4)).astype(np.float32))[rng.integers(0, 3, n_items)]
    P = torch.from_numpy(rng.integers(-1, 2, size=(n_users, 4)).astype(np.float32))
    bu, bi = torch.zeros(n_users), torch.zeros(n_items)
    for k in (1, 5, 64, 150, 300):
        for tiles in [(None, None), (7, 13), (40, 101)]:
            ref = brute_force(P, Q, bu, bi, 0.0, k)
            got = fill_topk(*to_dev(device, P, Q, bu, bi), 0.0, k, user_block=tiles[0], item_tile=tiles[1])
            assert_exact(got, ref)


def test_all_equal_scores_and_everything_seen(device):
    n_users, n_items, k = 6, 20, 8
    P, Q = torch.zeros(n_users, 3), torch.zeros(n_items, 3)
    bu, bi = torch.zeros(n_users), torch.zeros(n_items)
    # user 0 saw everything, user 1 all but items 19 and 4, others nothing
    rows = [list(range(n_items)), [i for i in range(n_items) if i not in (4, 19)]] + [[]] * 4
    indptr = torch.tensor([0] + list(np.cumsum([len(r) for r in rows])), dtype=torch.int64)
    indices = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
    s, i = fill_topk(*to_dev(device, P, Q, bu, bi), 1.0, k, to_dev(device, indptr, indices), item_tile=3)
    assert (i[0] == -1).all() and torch.isneginf(s[0]).all()
    assert i[1].tolist() == [4, 19] + [-1] * 6
    assert i[2].tolist() == list(range(k))
    assert (s[2:] == 1.0).all()


def test_gaussian_inputs_match_float64_within_tolerance(device):
    rng = np.random.default_rng(7)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 64, 500, d=16, dyadic=False, full_users=(3,))
    k = 25
    ref_s, ref_i = brute_force(P, Q, bu, bi, mu, k, mask)
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
    ref_s, _ = brute_force(P, Q, bu, bi, mu, k, mask)
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
    ref = brute_force(P, Q, bu, bi, mu, k, mask)
    # 1 MiB -> 65,536 cells: the whole catalogue with blocks of ~93 users
    got = fill_topk(*to_dev(device, P, Q, bu, bi), mu, k, to_dev(device, *seen), memory_budget=1 << 20,
                    item_offset=1000)
    ref_items = np.where(ref[1] >= 0, ref[1] + 1000, -1)
    assert_exact(got, (ref[0], ref_items))


def test_tile_sizes_never_exceed_budget():
    for n_users, n_items, budget in [(600_000, 3000, 256 << 20), (10**6, 10**6, 40 << 30), (5, 7, 1 << 20),
                                     (100, 10**7, 1 << 20)]:
        block, tile = F.tile_sizes(n_users, n_items, 100, budget)
        assert 1 <= block <= n_users and 1 <= tile <= n_items
        assert block * tile * F.BYTES_PER_CELL <= max(budget, 400 * F.BYTES_PER_CELL * 1024)


def test_merge_topk_of_item_shards_equals_whole(device):
    rng = np.random.default_rng(6)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, 45, 230, full_users=(2,))
    k = 17
    whole = fill_topk(*to_dev(device, P, Q, bu, bi), mu, k, to_dev(device, *seen))
    parts = []
    for lo, hi in [(0, 50), (50, 51), (51, 180), (180, 230)]:
        local_mask = torch.from_numpy(mask[:, lo:hi])
        ptr = torch.cat([torch.zeros(1, dtype=torch.int64), local_mask.sum(1).cumsum(0)])
        idx = local_mask.nonzero()[:, 1].to(torch.int32)
        parts.append(fill_topk(*to_dev(device, P, Q[lo:hi], bu, bi[lo:hi]), mu, k, to_dev(device, ptr, idx),
                               item_offset=lo))
    # shards in any order give the same answer
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = merge_topk([parts[j] for j in order])
        assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])


def _rounding_tie_inputs():
    """Two items whose scores differ before μ + b_u is added and are one float32 after it:
    q_1 = q_0 + 2⁻²⁰, b_u = 1024 (an ulp there is 2⁻¹³); the higher raw score has the
    higher id, so ranking on unshifted scores breaks the tie rule."""
    P = torch.tensor([[1.0], [1.0]])
    Q = torch.tensor([[0.25], [0.25 + 2.0 ** -20], [0.125]])
    bu, bi = torch.tensor([1024.0, 0.0]), torch.zeros(3)
    return P, Q, bu, bi


def test_ties_made_by_the_user_shift_follow_the_reported_scores(device):
    P, Q, bu, bi = _rounding_tie_inputs()
    s, i = fill_topk(*to_dev(device, P, Q, bu, bi), 0.0, 3)
    assert s[0, 0] == s[0, 1] == 1024.25 and i[0].tolist() == [0, 1, 2]
    assert i[1].tolist() == [1, 0, 2]  # no shift: the raw order stands
    one = fill_topk(*to_dev(device, P, Q, bu, bi), 0.0, 1)
    assert one[1][:, 0].tolist() == [0, 1]  # the cut at k keeps the lower id of the tie
    # item shards merged give the same lists
    parts = [fill_topk(*to_dev(device, P, Q[lo:hi], bu, bi[lo:hi]), 0.0, 3, item_offset=lo)
             for lo, hi in ((0, 1), (1, 3))]
    merged = merge_topk(parts)
    assert torch.equal(merged[0], s) and torch.equal(merged[1], i)


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
    cols = F._exact_topk_cols(tile, 2)
    assert sorted(cols[0].tolist()) == [0, 1]


def test_score_dense_matches_reference():
    rng = np.random.default_rng(8)
    P, Q, bu, bi, mu, *_ = make_inputs(rng, 9, 31)
    ref = P.double() @ Q.double().T + bi.double() + bu.double()[:, None] + mu
    assert torch.equal(score_dense(P, Q, bu, bi, mu).double(), ref)


def test_csr_take_reorders_rows():
    indptr = torch.tensor([0, 2, 2, 5, 6])
    indices = torch.tensor([1, 4, 0, 2, 3, 9], dtype=torch.int32)
    ptr, idx = csr_take(indptr, indices, torch.tensor([3, 0, 1, 2]))
    assert ptr.tolist() == [0, 1, 3, 3, 6] and idx.tolist() == [9, 1, 4, 0, 2, 3]
    assert idx.dtype == torch.int32


def test_csr_slice_is_a_rebased_block_of_rows():
    indptr = torch.tensor([0, 2, 2, 5, 6])
    indices = torch.tensor([1, 4, 0, 2, 3, 9], dtype=torch.int32)
    ptr, idx = F.csr_slice(indptr, indices, 1, 3)
    assert ptr.tolist() == [0, 0, 3] and idx.tolist() == [0, 2, 3]
    ptr, idx = F.csr_slice(indptr, indices, 0, 2)  # a prefix: what the auto trial takes
    assert ptr.tolist() == [0, 2, 2] and idx.tolist() == [1, 4]
    assert F.csr_slice(indptr, indices, 4, 4)[0].tolist() == [0]


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


def test_triton_dispatch_only_on_cuda(monkeypatch):
    assert F._triton_impl(torch.device("cpu")) is None
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "torch")
    assert F._triton_impl(torch.device("cuda")) is None
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SVDFILL_FILL_KERNEL"):
        F._triton_impl(torch.device("cuda"))


def _result(scores):
    scores = torch.tensor(scores, dtype=torch.float32)
    return scores, torch.arange(scores.numel()).reshape(scores.shape)


TIES = [[4.0, 3.5, 3.5, float("-inf")]]


@pytest.mark.parametrize("torch_s,fused_s,fused_scores,want", [
    (1.0, 0.1, TIES, "triton"),                                    # faster, same scores
    (0.1, 1.0, TIES, "torch"),                                     # slower
    (1.0, 0.1, [[4.0, 3.5, 3.5 + 3e-5, float("-inf")]], "triton"),  # an ulp-level difference
    (1.0, 0.1, [[4.0, 3.7, 3.5, float("-inf")]], "torch"),          # a wrong score: never used
    (1.0, 0.1, [[4.0, 3.5, 3.5, 1.0]], "torch"),                    # a seen item let through
])
def test_auto_keeps_the_faster_kernel_once_per_key(monkeypatch, torch_s, fused_s, fused_scores, want):
    monkeypatch.setattr(F, "_CHOICES", {})
    calls = []

    def run_tiles():
        calls.append(1)
        return _result(TIES), torch_s

    def run_fused():
        return _result(fused_scores), fused_s

    with warnings.catch_warnings(record=True) as seen_warnings:
        warnings.simplefilter("always")
        for _ in range(2):
            assert F._pick_kernel(("k",), 10, run_tiles, run_fused,
                                  rel_tol=F.AUTO_TOLERANCE["float32"]) == want
    assert len(calls) == 1  # decided once per key
    assert F.kernel_choices()[("k",)]["kernel"] == want
    disagreed = F.kernel_choices()[("k",)]["reason"] == "fused disagreed"
    assert disagreed == any("disagreed" in str(w.message) for w in seen_warnings)


def test_auto_falls_back_to_tiles_when_the_kernel_fails(monkeypatch):
    monkeypatch.setattr(F, "_CHOICES", {})

    def run_fused():
        raise RuntimeError("out of resources: shared memory")

    with pytest.warns(UserWarning, match="failed its trial"):
        assert F._pick_kernel(("k",), 10, lambda: (_result(TIES), 0.5), run_fused,
                              rel_tol=1e-5) == "torch"
    got = F.kernel_choices()[("k",)]
    assert got["reason"] == "fused failed: RuntimeError" and got["torch_s"] == 0.5

    # an error of the tiles is not the fused kernel's: it propagates, and nothing is decided
    def run_tiles():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        F._pick_kernel(("k2",), 10, run_tiles, lambda: (_result(TIES), 0.1), rel_tol=1e-5)
    assert ("k2",) not in F.kernel_choices()


def test_auto_trial_through_the_real_dispatch(monkeypatch):
    """The whole auto path of fill_topk with the Triton kernel standing in on the CPU (its
    interpreter): the trial runs both on the first users, the result equals the tiles'
    either way, and the decision is recorded with both timings."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels.triton_fill import fill_topk_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(F, "_CHOICES", {})
    monkeypatch.setattr(F, "AUTO_MIN_USERS", 8)
    monkeypatch.setattr(F, "AUTO_TRIAL_USERS", 16)
    monkeypatch.setattr(F, "_triton_impl", lambda device: fill_topk_triton)
    # dyadic inputs: many exact ties, a user who has seen everything
    P, Q, bu, bi, mu, seen, _ = make_inputs(np.random.default_rng(5), 40, 23, d=6, full_users=(3,))
    want = F._fill_tiles(P, Q, bu, bi, mu, 5, seen, mode="float32")
    got = F.fill_topk(P, Q, bu, bi, mu, 5, seen)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (key, choice), = F.kernel_choices().items()
    assert key == ("cpu", 6, 5, "float32", True) and choice["kernel"] in ("torch", "triton")
    assert choice["torch_s"] > 0 and choice["triton_s"] > 0
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "triton")  # forced: no trial, same answer
    got = F.fill_topk(P, Q, bu, bi, mu, 5, seen)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("levels", [3, 30, 10_000])
def test_tile_topk_prefilter_with_ties_matches_lexsort(levels):
    """The group-max prefilter path (wide rows) against a lexsort, with few to many ties."""
    rng = np.random.default_rng(levels)
    tile = torch.from_numpy(rng.integers(0, levels, (40, 1003)).astype(np.float32))
    tile[0] = 1.0  # a constant row
    tile[1, ::2] = float("-inf")
    for k in (1, 7, 60, 200):
        assert F._group_size(1003, k) or k == 200
        vals, cols = F._tile_topk(tile, k)
        for r in range(tile.shape[0]):
            order = np.lexsort((np.arange(1003), -tile[r].numpy()))[:k]
            assert cols[r].tolist() == order.tolist()
            assert vals[r].tolist() == tile[r, order].tolist()


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_auto_kernel_on_cuda_decides_and_agrees(cuda, monkeypatch, dtype):
    """On the GPU: the first call of a shape records a decision with both timings (or why
    the fused kernel was refused), and the answer agrees with the torch tiles."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("SVDFILL_FILL_KERNEL", raising=False)
    monkeypatch.setattr(F, "_CHOICES", {})
    P, Q, bu, bi, mu, seen, _ = make_inputs(np.random.default_rng(11), 3000, 700, d=64, dyadic=False)
    P, Q, bu, bi = (t.to(cuda) for t in (P, Q, bu, bi))
    seen = (seen[0].to(cuda), seen[1].to(cuda))
    got_s, got_i = F.fill_topk(P, Q, bu, bi, mu, 50, seen, dtype=dtype)
    (key, choice), = F.kernel_choices().items()
    assert key[1:] == (64, 50, dtype or "float32", True)
    assert choice["kernel"] in ("torch", "triton") and choice["reason"], choice
    # the fused kernel compiled, ran and agreed: a failure or disagreement would fall back
    # to the tiles and still give the right answer, so only the record shows it
    assert choice["triton_s"] is not None and not choice["reason"].startswith("fused"), choice
    want_s, _ = F._fill_tiles(P, Q, bu, bi, mu, 50, seen, mode=dtype or "float32")
    fin = torch.isfinite(want_s)
    assert torch.equal(torch.isneginf(got_s), torch.isneginf(want_s))
    tol = F.AUTO_TOLERANCE[dtype or "float32"] * float(want_s[fin].abs().max())
    assert float((got_s - want_s)[fin].abs().max()) <= tol
