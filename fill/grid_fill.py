"""The fill on the grid layout: item blocks pass every rank's user block around a ring.

Rank r holds its users' rows (P_r, b_u_r) and its item block (Q_r, b_i_r). In W steps each
item block visits every rank (:class:`~svdfill.distributed.ring.Ring`); at each visit the
rank scores its users against the visiting block with
:func:`svdfill.kernels.fill.fill_topk` (``item_offset`` = the block's first item, the
block's seen entries made local) and merges the result into its users' running top-k with
:func:`svdfill.kernels.topk.merge_topk`. The tie rule (score descending, then lower item id)
makes the merged lists exactly the one-process fill's, whatever the blocks and their order.
No rank ever holds another rank's users or a full item table, and nothing is gathered to a
driver: each rank writes its own users' part (:func:`svdfill.fill.dataset.export_grid_part`).
"""

from __future__ import annotations

import torch

from svdfill.fill.shard import csr_restrict
from svdfill.kernels.fill import fill_topk
from svdfill.kernels.topk import merge_topk

Tensor = torch.Tensor


def grid_topk(user_factors: Tensor, user_bias: Tensor, item_factors: Tensor, item_bias: Tensor,
              item_lo: int, item_bounds: list[tuple[int, int]], global_mean: float, k: int,
              seen, ring, *, dtype: str | None = None,
              memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """This rank's users' top-k over the whole catalogue; collective (W shifts).

    user_factors float32 [U_r, d], user_bias [U_r]: this rank's users (any rows: a user
    block or a slice of one). item_factors [I_r, d], item_bias [I_r]: this rank's item
    block, whose first item is ``item_lo`` = ``item_bounds[ring.rank][0]``. item_bounds:
    every rank's ``(lo, hi)``. seen: CSR ``(indptr int64 [U_r+1], indices [nnz])`` of GLOBAL
    item ids per user row (rows sorted ascending), or None. k, dtype, memory_budget: as for
    :func:`~svdfill.kernels.fill.fill_topk`. ring: a
    :class:`svdfill.distributed.ring.Ring` (``rank``, ``size``, ``start_shift``; taken as given,
    not imported: ``fill`` sits below ``distributed``).

    Returns ``(scores float32 [U_r, k], items int64 [U_r, k])`` (global item ids; item −1,
    score −inf where fewer than k items are unseen) on the user tables' device.
    """
    r, W = ring.rank, ring.size
    if int(item_bounds[r][0]) != int(item_lo):
        raise ValueError(f"item block of rank {r} starts at {item_bounds[r][0]}, not {item_lo}")
    dev = user_factors.device
    n = user_factors.shape[0]
    best = (torch.full((n, k), float("-inf"), dtype=torch.float32, device=dev),
            torch.full((n, k), -1, dtype=torch.int64, device=dev))
    held = {"item_factors": item_factors, "item_bias": item_bias}
    for s in range(W):
        lo, hi = (int(x) for x in item_bounds[(r + s) % W])
        # the block moves on while it is scored here: the send only reads it
        pending = ring.start_shift(held)
        if n and hi > lo:
            part = None if seen is None else csr_restrict(seen[0].cpu(), seen[1].cpu(), lo, hi)
            got = fill_topk(user_factors, held["item_factors"], user_bias, held["item_bias"],
                            global_mean, k, part, item_offset=lo, dtype=dtype,
                            memory_budget=memory_budget)
            best = merge_topk([best, got], k)
        held = pending.wait()
    return best
