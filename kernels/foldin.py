"""Fold-in: the users' half of one ALS sweep, for rows outside the model's user table.

With the item side fixed, a user's ``[p_u, b_u]`` is the ridge solution of
:mod:`svdfill.kernels.als` (the factors and the bias solved jointly through the feature
``[q_i, 1]``, penalties ``λ_f·n^α`` and ``λ_b·n^β`` of a row with ``n`` ratings). This module
solves that system for rows given by their own ratings, with the same chunked normal
equations and the same batched Cholesky as :func:`~svdfill.kernels.als.als_sweep`, so a
fold-in of a user's ratings is exactly what the next ALS user half-sweep would give that
user (tested bit for bit in ``tests/test_foldin.py``).
"""

from __future__ import annotations

import torch

# Private helpers of the sibling module on purpose: fold-in must be the sweep's own solve,
# not a copy of it that could drift.
from svdfill.kernels.als import _build_side, _solve_side, default_budget_elements


@torch.no_grad()
def solve_users(item_factors: torch.Tensor, item_bias: torch.Tensor, global_mean: torch.Tensor,
                rows: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, n_rows: int, *,
                reg_factors: float, reg_bias: float, reg_exponent: float = 1.0,
                bias_reg_exponent: float = 1.0, budget_elements: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``n_rows`` user rows from their ratings with the items held fixed.

    Args:
        item_factors: float32 ``[I, d]``; item_bias: float32 ``[I]``; global_mean: 0-d μ.
            The device of ``item_factors`` is where the work runs.
        rows: int ``[n]`` row of each rating in ``[0, n_rows)``; items: int ``[n]`` in
            ``[0, I)``; ratings: float32 ``[n]``.
        reg_factors, reg_bias, reg_exponent, bias_reg_exponent: λ_f, λ_b, α, β as in
            :func:`~svdfill.kernels.als.als_sweep`.
        budget_elements: chunk budget (default: :func:`default_budget_elements`).

    Returns ``(factors float32 [n_rows, d], bias float32 [n_rows])`` on the items' device;
    a row without ratings is all zeros (what a user with nothing known gets: μ + b_i).
    Raises ``ValueError`` on bad shapes or ids, ``FloatingPointError`` on a non-finite
    solution.
    """
    if rows.dim() != 1 or rows.shape != items.shape or rows.shape != ratings.shape:
        raise ValueError(f"solve_users: rows, items and ratings must be 1-d of one length, got "
                         f"{tuple(rows.shape)}, {tuple(items.shape)}, {tuple(ratings.shape)}")
    if reg_factors < 0 or reg_bias < 0:
        raise ValueError(f"solve_users: regularization must be >= 0, got {reg_factors}, {reg_bias}")
    dev, dtype = item_factors.device, item_factors.dtype
    n_items, d = item_factors.shape
    r = rows.to(dev, torch.int64)
    i = items.to(dev, torch.int64)
    for name, ids, bound in (("rows", r, n_rows), ("items", i, n_items)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= bound):
            raise ValueError(f"solve_users: {name} must lie in [0, {bound})")
    factors = item_factors.new_zeros(n_rows, d)
    bias = item_factors.new_zeros(n_rows)
    if r.numel() == 0:
        return factors, bias
    budget = default_budget_elements(dev) if budget_elements is None else int(budget_elements)
    side = _build_side(r, i, n_rows, n_items, d + 1, budget)
    # ratings − μ with the trailing zero that padded slots gather, as in als_sweep
    centered = ratings.to(dev, dtype) - global_mean.to(dev, dtype)
    centered = torch.cat([centered, centered.new_zeros(1)])
    reg = (float(reg_factors), float(reg_bias), float(reg_exponent), float(bias_reg_exponent))
    _solve_side(factors, bias, item_factors.to(dtype), item_bias.to(dev, dtype), centered, side,
                reg, budget)
    return factors, bias
