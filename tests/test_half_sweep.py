"""kernels/half_sweep.py: a block's ridge solves given fetched rows, against a float64
per-row reference and against the one-process ALS sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.kernels.half_sweep import BlockSide, block_predict, solve_block, table


def _reference(rows, cols, r, n_rows, fetched, mu, lf, lb, alpha, beta, start_f, start_b):
    """float64 normal equations row by row."""
    d = fetched.shape[1] - 1
    f, b = start_f.double().clone(), start_b.double().clone()
    F = fetched.double()
    for row in range(n_rows):
        m = rows == row
        n = int(m.sum())
        if n == 0:
            continue
        Z = torch.cat([F[cols[m], :d], torch.ones(n, 1, dtype=torch.float64)], 1)
        y = r[m].double() - mu - F[cols[m], d]
        A = Z.T @ Z
        A[:d, :d] += torch.eye(d, dtype=torch.float64) * lf * n ** alpha
        A[d, d] += lb * n ** beta
        x = torch.linalg.solve(A, Z.T @ y)
        f[row], b[row] = x[:d], x[d]
    return f, b


@pytest.mark.parametrize("seed,n_rows,n_cols,n,d", [(0, 7, 5, 30, 3), (1, 40, 23, 300, 6),
                                                   (2, 1, 9, 9, 4), (3, 25, 60, 0, 2)])
def test_solve_block_matches_float64_reference(seed, n_rows, n_cols, n, d):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (n,), generator=g)
    cols = torch.randint(0, n_cols, (n,), generator=g)  # repeated pairs are fine for the algebra
    r = torch.randint(1, 6, (n,), generator=g).float()
    fetched = torch.randn(n_cols, d + 1, generator=g)
    f0, b0 = torch.randn(n_rows, d, generator=g), torch.randn(n_rows, generator=g)
    blk = BlockSide.build(rows, cols, r, n_rows, n_cols, d, "cpu", budget=64)  # tiny: many chunks, split rows
    f, b = f0.clone(), b0.clone()
    solve_block(f, b, fetched, blk, 3.25, reg_factors=0.3, reg_bias=0.7, reg_exponent=0.6,
                bias_reg_exponent=0.0)
    fr, br = _reference(rows, cols, r, n_rows, fetched, float(np.float32(3.25)), 0.3, 0.7, 0.6, 0.0, f0, b0)
    torch.testing.assert_close(f.double(), fr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.double(), br, rtol=1e-4, atol=1e-4)
    # rows without ratings keep their values
    empty = torch.bincount(rows, minlength=n_rows) == 0
    assert torch.equal(f[empty], f0[empty]) and torch.equal(b[empty], b0[empty])


def test_user_block_equals_one_process_user_side():
    """A user block solved from the fetched rows of its items = those users after the user
    half of als_sweep (the item half then changes only items)."""
    from svdfill.kernels.als import als_sweep
    from svdfill.kernels.model import BiasedMF

    g = torch.Generator().manual_seed(5)
    U, I, n, d = 30, 20, 400, 4
    key = torch.randperm(U * I, generator=g)[:n]
    u, i = key // I, key % I
    r = torch.randint(1, 6, (n,), generator=g).float()
    m = BiasedMF(U, I, d, init_std=0.3, global_mean=3.1, seed=1)
    q0, bi0 = m.item_factors.detach().clone(), torch.randn(I, generator=g)
    m.item_bias.data.copy_(bi0)
    als_sweep(m, u, i, r, reg_factors=0.2, reg_bias=0.1)
    lo, hi = 10, 22
    mine = (u >= lo) & (u < hi)
    need, cols = torch.unique(i[mine], return_inverse=True)
    blk = BlockSide.build(u[mine] - lo, cols, r[mine], hi - lo, need.numel(), d, "cpu")
    f = torch.zeros(hi - lo, d)
    b = torch.zeros(hi - lo)
    solve_block(f, b, table(q0, bi0)[need], blk, float(m.global_mean), reg_factors=0.2, reg_bias=0.1)
    rated = blk.counts > 0
    torch.testing.assert_close(f[rated], m.user_factors.detach()[lo:hi][rated], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[rated], m.user_bias.detach()[lo:hi][rated], rtol=1e-5, atol=1e-5)


def test_block_predict_is_the_model_prediction():
    from svdfill.kernels.model import BiasedMF

    g = torch.Generator().manual_seed(2)
    m = BiasedMF(9, 13, 5, init_std=1.0, global_mean=2.5)
    m.user_bias.data.normal_(generator=g)
    m.item_bias.data.normal_(generator=g)
    u = torch.randint(3, 9, (50,), generator=g)
    i = torch.randint(0, 13, (50,), generator=g)
    need, cols = torch.unique(i, return_inverse=True)
    fetched = table(m.item_factors.detach(), m.item_bias.detach())[need]
    got = block_predict(m.user_factors.detach()[3:], m.user_bias.detach()[3:], u - 3, fetched, cols, 2.5)
    torch.testing.assert_close(got, m.predict(u, i), rtol=0, atol=1e-6)


def test_block_side_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="cols"):
        BlockSide.build(torch.tensor([0]), torch.tensor([3]), torch.tensor([1.0]), 1, 3, 2, "cpu")
    blk = BlockSide.build(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), 1, 1, 2, "cpu")
    with pytest.raises(ValueError, match="fetched"):
        solve_block(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), blk, 0.0,
                    reg_factors=0.1, reg_bias=0.1)
