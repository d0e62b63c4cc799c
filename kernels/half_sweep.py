"""One side of an ALS sweep on a block of rows, given the fetched rows of the other side.

The grid layout (:mod:`svdfill.distributed.grid`) solves a rank's own user block from the
item rows its users rated (fetched from their owners), then its item block from the user
rows its items' raters hold. Both are the one-process solve of :mod:`svdfill.kernels.als`
restricted to a block: the same padded chunks (``_build_side``), the same normal equations
(``side_features``, ``chunk_normal_equations``) and the same penalties ``λ_f·n^α``,
``λ_b·n^β`` with ``n`` the row's rating count — complete, since a block holds every rating
of its rows. Only the columns are renumbered: column ``j`` is row ``j`` of the fetched table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdfill.kernels import als as _als


@dataclass
class BlockSide:
    """The ratings of a block of rows, ready for repeated half-sweeps.

    rows: int64 [n] block-local row ids; cols: int64 [n] indices into the fetched table;
    ratings: float32 [n]; n_rows, n_cols: the block's rows and the fetched table's rows;
    side: the padded chunks (built once); counts: int64 [n_rows] ratings per row.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    ratings: torch.Tensor
    n_rows: int
    n_cols: int
    side: object
    counts: torch.Tensor
    budget: int

    @classmethod
    def build(cls, rows: torch.Tensor, cols: torch.Tensor, ratings: torch.Tensor, n_rows: int,
              n_cols: int, d: int, device: torch.device, budget: int | None = None) -> "BlockSide":
        """Chunks for rows of ``d + 1`` unknowns on ``device`` (budget as ``als_sweep``).
        Raises ``ValueError`` on ids out of range."""
        dev = torch.device(device)
        b = _als.default_budget_elements(dev) if budget is None else int(budget)
        r = rows.to(dev, torch.int64)
        c = cols.to(dev, torch.int64)
        for name, ids, bound in (("rows", r, n_rows), ("cols", c, n_cols)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= bound):
                raise ValueError(f"BlockSide: {name} must lie in [0, {bound})")
        side = _als._build_side(r, c, n_rows, n_cols, d + 1, b)
        counts = torch.bincount(r, minlength=n_rows)
        return cls(r, c, ratings.to(dev, torch.float32), n_rows, n_cols, side, counts, b)


@torch.no_grad()
def solve_block(factors: torch.Tensor, bias: torch.Tensor, fetched: torch.Tensor,
                block: BlockSide, global_mean: float, *, reg_factors: float, reg_bias: float,
                reg_exponent: float = 1.0, bias_reg_exponent: float = 1.0) -> None:
    """Overwrite the rated rows of ``factors [n_rows, d]`` / ``bias [n_rows]`` (float32, in
    place) with their ridge solutions given ``fetched [n_cols, d+1]`` = ``[q, b]`` of the
    other side's rows. Rows without ratings keep their values (as ``als_sweep``)."""
    d = factors.shape[1]
    if fetched.shape != (block.n_cols, d + 1):
        raise ValueError(f"solve_block: fetched must be [{block.n_cols}, {d + 1}], got "
                         f"{tuple(fetched.shape)}")
    if block.rows.numel() == 0:
        return
    centered = block.ratings - torch.tensor(float(global_mean), dtype=torch.float32,
                                            device=block.ratings.device)
    centered = torch.cat([centered, centered.new_zeros(1)])
    reg = (float(reg_factors), float(reg_bias), float(reg_exponent), float(bias_reg_exponent))
    _als._solve_side(factors, bias, fetched[:, :d], fetched[:, d], centered, block.side, reg,
                     block.budget)


def table(factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[rows, d+1]`` = ``[factors, bias]``: the rows an exchange moves (one collective
    for both)."""
    return torch.cat([factors, bias.unsqueeze(1)], dim=1)


@torch.no_grad()
def block_predict(factors: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor,
                  fetched: torch.Tensor, cols: torch.Tensor, global_mean: float) -> torch.Tensor:
    """float32 [n] predictions ``μ + b_row + b_col + p_row·q_col`` for block-local ``rows``
    and ``cols`` into ``fetched [n_cols, d+1]``, in chunks of bounded memory."""
    d = factors.shape[1]
    out = torch.empty(rows.numel(), dtype=torch.float32, device=factors.device)
    step = max(4096, (1 << 18) // max(d, 1))
    mu = torch.tensor(float(global_mean), dtype=torch.float32, device=factors.device)
    for s in range(0, rows.numel(), step):
        r, c = rows[s:s + step], cols[s:s + step]
        p, q = factors.index_select(0, r), fetched.index_select(0, c)
        out[s:s + step] = (mu + bias.index_select(0, r) + q[:, d]
                           + (p * q[:, :d]).sum(1))
    return out
