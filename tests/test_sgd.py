"""kernels.sgd against the float64 SGD step of tests/reference.py (repeated rows summed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import sgd_step_reference
from svdfill.kernels.sgd import sgd_step, sgd_step_split


def _tables(U, I, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(U, d, generator=g) * 0.3, torch.randn(I, d, generator=g) * 0.3,
            torch.randn(U, generator=g) * 0.2, torch.randn(I, generator=g) * 0.2)


@pytest.mark.parametrize("U,I,d,n,seed", [(7, 5, 3, 40, 0), (1, 1, 1, 1, 1), (13, 4, 8, 97, 2),
                                          (50, 60, 5, 33, 3)])
def test_sgd_step_matches_reference_with_repeated_rows(U, I, d, n, seed):
    g = torch.Generator().manual_seed(100 + seed)
    users = torch.randint(0, U, (n,), generator=g)
    items = torch.randint(0, I, (n,), generator=g)
    ratings = torch.rand(n, generator=g) * 4 + 1
    P, Q, bu, bi = _tables(U, I, d, seed)
    ref = sgd_step_reference(P, Q, bu, bi, 3.1, users, items, ratings, lr=0.05, reg_factors=0.1,
                             reg_bias=0.02)
    sgd_step(P, Q, bu, bi, 3.1, users, items, ratings, lr=0.05, reg_factors=0.1, reg_bias=0.02)
    for got, want in zip((P, Q, bu, bi), ref):
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_single_rating_is_the_surprise_step():
    P, Q, bu, bi = _tables(2, 2, 4, 5)
    p, q, b_u, b_i = P[1].clone(), Q[0].clone(), bu[1].item(), bi[0].item()
    e = 4.0 - (3.5 + b_u + b_i + float(p @ q))
    sgd_step(P, Q, bu, bi, torch.tensor(3.5), torch.tensor([1]), torch.tensor([0]),
             torch.tensor([4.0]), lr=0.01, reg_factors=0.02, reg_bias=0.03)
    torch.testing.assert_close(P[1], p + 0.01 * (e * q - 0.02 * p))
    torch.testing.assert_close(Q[0], q + 0.01 * (e * p - 0.02 * q))
    assert bu[1].item() == pytest.approx(b_u + 0.01 * (e - 0.03 * b_u), rel=1e-6)
    assert bi[0].item() == pytest.approx(b_i + 0.01 * (e - 0.03 * b_i), rel=1e-6)


def test_split_step_plus_deltas_equals_full_step():
    g = torch.Generator().manual_seed(9)
    users = torch.randint(0, 6, (30,), generator=g)
    items = torch.randint(0, 4, (30,), generator=g)
    ratings = torch.rand(30, generator=g) * 4 + 1
    full = _tables(6, 4, 3, 1)
    part = tuple(t.clone() for t in full)
    sgd_step(*full, 3.0, users, items, ratings, lr=0.02, reg_factors=0.05, reg_bias=0.01)
    dP, db = torch.zeros(6, 3), torch.zeros(6)
    sgd_step_split(*part, 3.0, users, items, ratings, lr=0.02, reg_factors=0.05, reg_bias=0.01,
                   user_factors_delta=dP, user_bias_delta=db)
    part[0].add_(dP)
    part[2].add_(db)
    for a, b in zip(full, part):
        torch.testing.assert_close(a, b)


def test_int32_indices_and_empty_batch():
    P, Q, bu, bi = _tables(3, 3, 2, 0)
    before = [t.clone() for t in (P, Q, bu, bi)]
    sgd_step(P, Q, bu, bi, 3.0, torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
             torch.zeros(0), lr=0.1, reg_factors=0.1, reg_bias=0.1)
    for a, b in zip(before, (P, Q, bu, bi)):
        assert torch.equal(a, b)
    sgd_step(P, Q, bu, bi, 3.0, torch.tensor([2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
             torch.tensor([5.0]), lr=0.1, reg_factors=0.1, reg_bias=0.1)
    assert not torch.equal(before[0][2], P[2]) and torch.equal(before[0][0], P[0])


def test_row_sparse_adam_matches_torch_sparse_adam():
    from svdfill.kernels.model import BiasedMF
    from svdfill.kernels.sgd import RowSparseAdam

    a = BiasedMF(9, 7, 3, init_std=0.3, global_mean=3.0, seed=4, sparse=True)
    b = BiasedMF(9, 7, 3, init_std=0.3, global_mean=3.0, seed=4, sparse=True)
    oa = torch.optim.SparseAdam(list(a.parameters()), lr=0.05)
    ob = RowSparseAdam(list(b.parameters()), lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        u = torch.randint(0, 9, (12,), generator=g)  # repeated rows on purpose
        i = torch.randint(0, 7, (12,), generator=g)
        r = torch.rand(12, generator=g) * 4 + 1
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            pred, pen = m(u, i, reg=(0.05, 0.01))
            (((r - pred) ** 2).sum() + pen).backward()
            o.step()
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), rtol=1e-5, atol=1e-6)
    untouched = ob.state[b.user_factors]["exp_avg"]
    assert untouched.shape == b.user_factors.shape
