"""kernels.triton_fill: the fused fill against a float64 brute force (exact on dyadic inputs,
within the documented tolerance on random ones), on CPU through Triton's interpreter and on
CUDA compiled.

The interpreter is chosen per call from ``TRITON_INTERPRET`` (see kernels.triton_util), so
setting it in a fixture works whatever was imported before — including triton itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]'); "
                                     "the fused kernels and their tests need it")

from svdfill.kernels.triton_fill import fill_topk_triton  # noqa: E402


@pytest.fixture
def device(kernel_device):
    """cpu (Triton's interpreter) and cuda (compiled): conftest.kernel_device."""
    return kernel_device


# --------------------------------------------------------------------------- references

def brute_force(P, Q, bu, bi, mu, k, seen=None):
    """float64 scores, top-k by (score desc, item asc); missing → (−inf, −1)."""
    S = P.double().cpu() @ Q.double().cpu().T + bi.double().cpu()[None, :] \
        + bu.double().cpu()[:, None] + float(mu)
    U, I = S.shape
    if seen is not None:
        ip, ix = (t.cpu() for t in seen)
        for u in range(U):
            S[u, ix[ip[u]: ip[u + 1]].long()] = float("-inf")
    # a stable descending sort keeps equal scores in ascending item order
    order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, : min(k, I)]
    sc = torch.gather(S, 1, order)
    it = torch.where(torch.isneginf(sc), torch.full_like(order, -1), order)
    if k > I:
        sc = torch.cat([sc, torch.full((U, k - I), float("-inf"), dtype=sc.dtype)], 1)
        it = torch.cat([it, torch.full((U, k - I), -1, dtype=it.dtype)], 1)
    return sc, it, S


def dyadic(shape, gen, scale=4, lo=-4, hi=5):
    """Small multiples of 1/scale: float32 arithmetic on them is exact, and ties are common."""
    return torch.randint(lo, hi, shape, generator=gen).float() / scale


def random_csr(U, I, gen, full_rows=(), max_per_row=None):
    """Sorted per-row seen sets; rows in ``full_rows`` have seen every item."""
    max_per_row = max_per_row or max(1, I // 3)
    indptr, indices = [0], []
    for u in range(U):
        if u in full_rows:
            row = list(range(I))
        else:
            n = int(torch.randint(0, max_per_row + 1, (1,), generator=gen))
            row = sorted(torch.randperm(I, generator=gen)[:n].tolist())
        indices += row
        indptr.append(len(indices))
    return torch.tensor(indptr, dtype=torch.int64), torch.tensor(indices, dtype=torch.int32)


def problem(U, I, d, seed, *, seen=True, full_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    P, Q = dyadic((U, d), g), dyadic((I, d), g)
    bu, bi = dyadic((U,), g, scale=8), dyadic((I,), g, scale=8)
    csr = random_csr(U, I, g, full_rows=full_rows) if seen else None
    return P, Q, bu, bi, 3.5, csr


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# --------------------------------------------------------------------------- exactness

TILES = [dict(), dict(block_u=16, block_i=16, n_chunks=3), dict(block_u=32, block_i=32)]


@pytest.mark.parametrize("k", [1, 5, 101])
@pytest.mark.parametrize("tiles", TILES, ids=["default", "16x16x3chunks", "32x32"])
def test_exact_on_dyadic_inputs_with_ties_and_seen(device, k, tiles):
    P, Q, bu, bi, mu, csr = problem(37, 101, 13, seed=k)
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, mu, k, csr)
    seen = tuple(on(device, *csr))
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), mu, k, seen, **tiles)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (37, k)
    assert torch.equal(i.cpu(), ref_i)
    assert torch.equal(s.cpu().double(), ref_s)
    # the user who has seen everything gets nothing
    assert (i[3] == -1).all() and torch.isneginf(s[3]).all()


def test_k_larger_than_items_pads(device):
    P, Q, bu, bi, mu, csr = problem(19, 23, 5, seed=7)
    k = 30
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, mu, k, csr)
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), mu, k, tuple(on(device, *csr)))
    assert torch.equal(i.cpu(), ref_i) and torch.equal(s.cpu().double(), ref_s)
    assert (i[:, 23:] == -1).all()


def test_no_seen_and_item_offset(device):
    P, Q, bu, bi, mu, _ = problem(21, 70, 16, seed=3, seen=False)
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, mu, 7)
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), mu, 7, None, item_offset=1000,
                            block_u=16, block_i=32)
    assert torch.equal(i.cpu(), ref_i + 1000) and torch.equal(s.cpu().double(), ref_s)


def test_overflowing_rows_are_rerun_exactly(device):
    """A tiny candidate capacity forces the re-run path for most rows; still exact."""
    P, Q, bu, bi, mu, csr = problem(37, 101, 13, seed=11)
    stats: dict = {}
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), mu, 5, tuple(on(device, *csr)),
                            block_u=16, block_i=16, n_chunks=2, capacity=6, stats=stats)
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, mu, 5, csr)
    assert stats["rerun_rows"] > 10, stats
    assert torch.equal(i.cpu(), ref_i) and torch.equal(s.cpu().double(), ref_s)


def test_all_scores_tied_breaks_by_lower_item(device):
    U, I, d, k = 17, 40, 4, 6
    P, Q = torch.zeros(U, d), torch.zeros(I, d)
    bu, bi = torch.zeros(U), torch.zeros(I)
    g = torch.Generator().manual_seed(5)
    csr = random_csr(U, I, g, max_per_row=10)
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), 1.0, k, tuple(on(device, *csr)),
                            block_u=16, block_i=16)
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, 1.0, k, csr)
    assert torch.equal(i.cpu(), ref_i) and torch.equal(s.cpu().double(), ref_s)


def test_ties_made_by_the_user_shift_follow_the_reported_scores(device):
    """Selection on μ + b_u + b_i + p·q, not on the unshifted score (see test_fill)."""
    from test_fill import _rounding_tie_inputs

    P, Q, bu, bi = _rounding_tie_inputs()
    P, Q = torch.cat([P, torch.zeros(14, 1)]), torch.cat([Q, torch.zeros(13, 1)])
    bu, bi = torch.cat([bu, torch.zeros(14)]), torch.cat([bi, torch.full((13,), -9.0)])
    for k in (1, 3):
        s, i = fill_topk_triton(*on(device, P, Q, bu, bi), 0.0, k, block_u=16, block_i=16)
        assert i[0].cpu().tolist() == [0, 1, 2][:k] and i[1].cpu().tolist() == [1, 0, 2][:k]
        assert float(s[0, 0]) == 1024.25


def test_negative_zero_ties_with_positive_zero(device):
    """-0.0 and +0.0 are equal scores: the lower item must win, whatever the sign bit."""
    P = torch.tensor([[1.0], [1.0]] + [[0.0]] * 14)
    Q = torch.tensor([[-0.0], [0.0], [0.0], [-1.0]] + [[-2.0]] * 12)
    bu, bi = torch.zeros(16), torch.tensor([-0.0, 0.0, -0.0, 0.0] + [-1.0] * 12)
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), 0.0, 3, None, block_u=16, block_i=16)
    ref_s, ref_i, _ = brute_force(P, Q, bu, bi, 0.0, 3)
    assert torch.equal(i.cpu(), ref_i)


# --------------------------------------------------------------------------- tolerance

def _check_within(s, i, S64, k, tol):
    """Returned items: unseen, distinct, scores within tol of float64, descending, and no
    left-out unseen item beats the k-th returned one by more than tol."""
    s, i = s.cpu().double(), i.cpu()
    U = S64.shape[0]
    for u in range(U):
        valid = i[u] >= 0
        items = i[u][valid]
        assert items.unique().numel() == items.numel()
        true = S64[u, items]
        assert torch.isfinite(true).all(), "a seen item was returned"
        assert (s[u][valid] - true).abs().max() <= tol[u].max() if items.numel() else True
        assert (s[u][valid][1:] <= s[u][valid][:-1]).all()
        n_unseen = int(torch.isfinite(S64[u]).sum())
        assert items.numel() == min(k, n_unseen)
        rest = S64[u].clone()
        rest[items] = float("-inf")
        if items.numel() and torch.isfinite(rest).any():
            assert rest.max() <= true.min() + 2 * tol[u].max()


@pytest.mark.parametrize("dtype", [None, "tf32", torch.bfloat16])
def test_random_inputs_within_documented_tolerance(device, dtype):
    U, I, d, k = 29, 83, 24, 9
    g = torch.Generator().manual_seed(21)
    P, Q = torch.randn(U, d, generator=g), torch.randn(I, d, generator=g)
    bu, bi = torch.randn(U, generator=g), torch.randn(I, generator=g)
    csr = random_csr(U, I, g, full_rows=(0,))
    _, _, S64 = brute_force(P, Q, bu, bi, 3.0, k, csr)
    mag = (P.abs().double() @ Q.abs().double().T + bi.abs().double()[None, :]).max(1).values
    # float32: a few ulps of the magnitudes summed; tf32/bf16: 2^-11 / 2^-8 relative
    rel = {None: 1e-6, "tf32": 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    tol = mag * rel + 1e-5
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), 3.0, k, tuple(on(device, *csr)),
                            dtype=dtype, block_u=16, block_i=32, n_chunks=2)
    _check_within(s, i, S64, k, tol)
    assert (i[0] == -1).all()


# --------------------------------------------------------------------------- API

def test_agrees_with_torch_fill_topk(device):
    from svdfill.kernels.fill import fill_topk, merge_topk

    P, Q, bu, bi, mu, csr = problem(33, 64, 8, seed=4)
    want = fill_topk(P, Q, bu, bi, mu, 10, csr, user_block=8, item_tile=16)
    got = fill_topk_triton(*on(device, P, Q, bu, bi), mu, 10, tuple(on(device, *csr)))
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
    # item shards with offsets merge to the whole fill (what the distributed fill does)
    parts = []
    for lo, hi in ((0, 20), (20, 64)):
        ip, ix = csr
        keep = (ix >= lo) & (ix < hi)
        rows = torch.repeat_interleave(torch.arange(33), ip[1:] - ip[:-1])[keep]
        sub_ip = torch.zeros(34, dtype=torch.int64)
        sub_ip[1:] = torch.cumsum(torch.bincount(rows, minlength=33), 0)
        shard_seen = (sub_ip.to(device), (ix[keep] - lo).to(device))
        parts.append(fill_topk_triton(*on(device, P, Q[lo:hi], bu, bi[lo:hi]), mu, 10,
                                      shard_seen, item_offset=lo, block_u=16, block_i=16))
    merged = merge_topk([(s.cpu(), i.cpu()) for s, i in parts])
    assert torch.equal(merged[1], want[1]) and torch.equal(merged[0], want[0])


def test_cpu_without_interpreter_is_the_torch_fill(monkeypatch):
    from svdfill.kernels.fill import fill_topk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    P, Q, bu, bi, mu, csr = problem(40, 50, 6, seed=9)
    got = fill_topk_triton(P, Q, bu, bi, mu, 4, csr)
    want = fill_topk(P, Q, bu, bi, mu, 4, csr)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    P, Q, bu, bi, mu, _ = problem(5, 6, 3, seed=0, seen=False)
    with pytest.raises(ValueError, match="k must be"):
        fill_topk_triton(P, Q, bu, bi, mu, 0)
    with pytest.raises(ValueError, match="same d"):
        fill_topk_triton(P, Q[:, :2], bu, bi, mu, 2)
    with pytest.raises(ValueError, match="dtype"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, dtype="float16")
    with pytest.raises(ValueError, match="indptr"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, (torch.zeros(3, dtype=torch.int64),
                                              torch.zeros(0, dtype=torch.int32)))
    with pytest.raises(ValueError, match="block_i"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, block_i=24)
