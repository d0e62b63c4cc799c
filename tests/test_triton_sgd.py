"""kernels.triton_sgd: the fused SGD step against the contract math (float64) and the torch
step, on CPU through Triton's interpreter and on CUDA compiled; convergence to the same RMSE.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]'); "
                                     "the fused kernels and their tests need it")

from reference import sgd_step_reference as reference_step  # noqa: E402
from svdfill.kernels.triton_sgd import fused_sgd_step  # noqa: E402

HP = dict(lr=0.05, reg_factors=0.02, reg_bias=0.01)


@pytest.fixture
def device(kernel_device):
    """cpu (Triton's interpreter) and cuda (compiled): conftest.kernel_device."""
    return kernel_device


def tables(U, I, d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(U, d, generator=g) * 0.3, torch.randn(I, d, generator=g) * 0.3,
           torch.randn(U, generator=g) * 0.2, torch.randn(I, generator=g) * 0.2)
    return [t.to(device) for t in out]


def batch(U, I, n, seed, *, unique, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if unique:
        users, items = torch.randperm(U, generator=g)[:n], torch.randperm(I, generator=g)[:n]
    else:
        users, items = torch.randint(0, U, (n,), generator=g), torch.randint(0, I, (n,), generator=g)
    ratings = torch.randint(1, 6, (n,), generator=g).float()
    return users.to(device), items.to(device), ratings.to(device)


def assert_close(got, want, rtol=2e-5, atol=2e-6):
    for g, w, name in zip(got, want, ("user_factors", "item_factors", "user_bias", "item_bias")):
        torch.testing.assert_close(g.detach().cpu().double(), w, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("d", [13, 64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_unique_rows_equal_the_contract(device, d, index_dtype):
    U, I, n = 70, 60, 50
    P, Q, bu, bi = tables(U, I, d, seed=d, device=device)
    users, items, ratings = batch(U, I, n, seed=1, unique=True, device=device)
    want = reference_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP)
    fused_sgd_step(P, Q, bu, bi, 3.5, users.to(index_dtype), items.to(index_dtype), ratings,
                   **HP, block_n=16)  # 4 programs: ragged last one
    assert_close((P, Q, bu, bi), want)


def test_repeated_rows_in_one_program_are_summed(device):
    U, I, d, n = 9, 7, 16, 60
    P, Q, bu, bi = tables(U, I, d, seed=2, device=device)
    users, items, ratings = batch(U, I, n, seed=3, unique=False, device=device)
    assert users.unique().numel() < n and items.unique().numel() < n
    want = reference_step(P, Q, bu, bi, 3.0, users, items, ratings, **HP)
    fused_sgd_step(P, Q, bu, bi, 3.0, users, items, ratings, **HP, block_n=64)
    assert_close((P, Q, bu, bi), want)


def test_repeated_rows_across_programs_lose_no_update(monkeypatch):
    """Hogwild across programs. The interpreter runs programs one after another, so the
    result must equal the contract applied program by program: every delta applied once,
    each computed from the state the earlier programs left (on CUDA the interleaving is
    arbitrary, which is what the convergence test covers)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    U, I, d, n, bn = 6, 5, 8, 70, 16
    P, Q, bu, bi = tables(U, I, d, seed=4)
    users, items, ratings = batch(U, I, n, seed=5, unique=False)
    want = (P, Q, bu, bi)
    for lo in range(0, n, bn):
        sl = slice(lo, lo + bn)
        want = reference_step(*want, 3.5, users[sl], items[sl], ratings[sl], **HP)
    fused_sgd_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP, block_n=bn)
    assert_close((P, Q, bu, bi), want)


def test_plain_stores_equal_the_contract_without_repeats(device):
    U, I, d, n = 40, 45, 32, 33
    P, Q, bu, bi = tables(U, I, d, seed=6, device=device)
    users, items, ratings = batch(U, I, n, seed=7, unique=True, device=device)
    want = reference_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP)
    fused_sgd_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP, atomics=False)
    assert_close((P, Q, bu, bi), want)


def test_global_mean_as_tensor_and_empty_batch(device):
    P, Q, bu, bi = tables(10, 10, 4, seed=8, device=device)
    before = [t.clone() for t in (P, Q, bu, bi)]
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    fused_sgd_step(P, Q, bu, bi, torch.tensor(3.5), empty, empty, empty.float(), **HP)
    for a, b in zip((P, Q, bu, bi), before):
        assert torch.equal(a, b)
    users, items, ratings = batch(10, 10, 5, seed=9, unique=True, device=device)
    want = reference_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP)
    fused_sgd_step(P, Q, bu, bi, torch.tensor(3.5), users, items, ratings, **HP)
    assert_close((P, Q, bu, bi), want)


def test_matches_the_torch_step(device):
    sgd = pytest.importorskip("svdfill.kernels.sgd", reason="kernels.sgd (the torch twin) missing")
    U, I, d, n = 50, 40, 24, 30
    P, Q, bu, bi = tables(U, I, d, seed=10, device=device)
    P2, Q2, bu2, bi2 = (t.clone() for t in (P, Q, bu, bi))
    users, items, ratings = batch(U, I, n, seed=11, unique=True, device=device)
    sgd.sgd_step(P2, Q2, bu2, bi2, 3.5, users, items, ratings, **HP)
    fused_sgd_step(P, Q, bu, bi, 3.5, users, items, ratings, **HP, block_n=16)
    for a, b in zip((P, Q, bu, bi), (P2, Q2, bu2, bi2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _planted(seed, U=100, I=60, rank=3, n=3000):
    """Planted rank-3 ratings with noise σ = 0.3; 90/10 split."""
    g = torch.Generator().manual_seed(seed)
    Pt, Qt = torch.randn(U, rank, generator=g) * 0.6, torch.randn(I, rank, generator=g) * 0.6
    users = torch.randint(0, U, (n,), generator=g)
    items = torch.randint(0, I, (n,), generator=g)
    r = 3.5 + (Pt[users] * Qt[items]).sum(1) + 0.3 * torch.randn(n, generator=g)
    perm = torch.randperm(n, generator=g)
    tr, va = perm[: n * 9 // 10], perm[n * 9 // 10:]
    return U, I, (users[tr], items[tr], r[tr]), (users[va], items[va], r[va])


def _train(step, U, I, train, val, device, *, epochs=20, batch_size=512, **extra):
    """Same init and same shuffles for every step function; returns (val RMSE, RMSE of μ)."""
    d = 8
    g = torch.Generator().manual_seed(1)
    P = (torch.randn(U, d, generator=g) * 0.1).to(device)
    Q = (torch.randn(I, d, generator=g) * 0.1).to(device)
    bu, bi = torch.zeros(U, device=device), torch.zeros(I, device=device)
    users, items, r = (t.to(device) for t in train)
    mu = float(r.mean())
    for epoch in range(epochs):
        perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(epoch)).to(device)
        for lo in range(0, len(r), batch_size):
            idx = perm[lo: lo + batch_size]
            step(P, Q, bu, bi, mu, users[idx], items[idx], r[idx], lr=0.05, reg_factors=0.02,
                 reg_bias=0.01, **extra)
    vu, vi, vr = (t.to(device) for t in val)
    pred = mu + bu[vu] + bi[vi] + (P[vu] * Q[vi]).sum(1)
    return float(((pred - vr) ** 2).mean().sqrt()), float(((mu - vr) ** 2).mean().sqrt())


def test_converges_to_the_torch_rmse(device):
    """Hogwild across 8 programs per batch of 512 over 100 users × 60 items: nearly every
    batch repeats users and items across programs."""
    sgd = pytest.importorskip("svdfill.kernels.sgd", reason="kernels.sgd (the torch twin) missing")
    U, I, train, val = _planted(0)
    ref, base = _train(sgd.sgd_step, U, I, train, val, "cpu")
    got, _ = _train(fused_sgd_step, U, I, train, val, device, block_n=64)
    assert ref < base - 0.2, (ref, base)  # learnable: the comparison means something
    assert abs(got - ref) <= 0.003, (got, ref)


def test_cpu_without_interpreter_is_the_torch_step(monkeypatch):
    sgd = pytest.importorskip("svdfill.kernels.sgd", reason="kernels.sgd (the torch twin) missing")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    P, Q, bu, bi = tables(30, 20, 8, seed=12)
    P2, Q2, bu2, bi2 = (t.clone() for t in (P, Q, bu, bi))
    users, items, ratings = batch(30, 20, 40, seed=13, unique=False)
    fused_sgd_step(P, Q, bu, bi, 3.0, users, items, ratings, **HP)
    sgd.sgd_step(P2, Q2, bu2, bi2, 3.0, users, items, ratings, **HP)
    for a, b in zip((P, Q, bu, bi), (P2, Q2, bu2, bi2)):
        assert torch.equal(a, b)


def test_bad_arguments(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    P, Q, bu, bi = tables(5, 5, 4, seed=0)
    users, items, ratings = batch(5, 5, 3, seed=0, unique=True)
    with pytest.raises(TypeError, match="float32"):
        fused_sgd_step(P.double(), Q, bu, bi, 3.0, users, items, ratings, **HP)
    with pytest.raises(ValueError, match="contiguous"):
        fused_sgd_step(P.t(), Q, bu, bi, 3.0, users, items, ratings, **HP)
    with pytest.raises(ValueError, match="same d"):
        fused_sgd_step(P, Q[:, :2].contiguous(), bu, bi, 3.0, users, items, ratings, **HP)
    with pytest.raises(ValueError, match="one length"):
        fused_sgd_step(P, Q, bu, bi, 3.0, users[:2], items, ratings, **HP)
    with pytest.raises(TypeError, match="int32 or int64"):
        fused_sgd_step(P, Q, bu, bi, 3.0, users.float(), items, ratings, **HP)
    with pytest.raises(ValueError, match="power of two"):
        fused_sgd_step(P, Q, bu, bi, 3.0, users, items, ratings, **HP, block_n=24)


def test_split_step_matches_the_torch_split(device):
    """Item-sharded rank: user deltas accumulate (repeated users included), items in place."""
    sgd = pytest.importorskip("svdfill.kernels.sgd", reason="kernels.sgd (the torch twin) missing")
    from svdfill.kernels.triton_sgd import fused_sgd_step_split

    U, I, d, n = 8, 40, 16, 30  # 8 users, 30 ratings: users repeat; items unique
    P, Q, bu, bi = tables(U, I, d, seed=14, device=device)
    P2, Q2, bu2, bi2 = (t.clone() for t in (P, Q, bu, bi))
    g = torch.Generator().manual_seed(15)
    users = torch.randint(0, U, (n,), generator=g).to(device)
    items = torch.randperm(I, generator=g)[:n].to(device)
    ratings = torch.randint(1, 6, (n,), generator=g).float().to(device)
    deltas = [torch.full((U, d), 0.5, device=device), torch.full((U,), 0.25, device=device)]
    deltas2 = [t.clone() for t in deltas]
    fused_sgd_step_split(P, Q, bu, bi, 3.5, users, items, ratings, **HP, block_n=16,
                         user_factors_delta=deltas[0], user_bias_delta=deltas[1])
    sgd.sgd_step_split(P2, Q2, bu2, bi2, 3.5, users, items, ratings, **HP,
                       user_factors_delta=deltas2[0], user_bias_delta=deltas2[1])
    assert torch.equal(P, P2) and torch.equal(bu, bu2)  # user tables only read
    for a, b in zip([Q, bi, *deltas], [Q2, bi2, *deltas2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
