"""Stratified distributed SGD (DSGD, Gemulla, Nijkamp, Haas & Sismanis, KDD 2011) on the grid.

Rank r owns user block r (P rows and b_u) for good; the item blocks travel. In sub-epoch
s = 0..W−1 rank r holds item block j = (r + s) mod W and runs SGD steps over the ratings
of block (r, j) — no two ranks touch the same user or item rows, so nothing is summed —
then every rank passes its item block to rank r − 1 (:class:`~svdfill.distributed.ring.Ring`).
After W sub-epochs every item block is home again. No table is ever all-reduced.

Each block's ratings are shuffled by a generator seeded from ``(seed, phase, epoch, r·W + j)``
alone, so an epoch's result depends on W and the data, never on timing; at W = 1 the one
block is shuffled and cut exactly as :class:`~svdfill.train.funk_sgd.FunkSGD` does, so
the epoch is the one-process Funk SGD epoch bit for bit.

With ``optimizer = "adagrad"`` (:func:`dsgd_adagrad_epoch`) each step is the row-sparse
Adagrad step of :mod:`svdfill.kernels.row_optim` on the block's rows: the user block's
Adagrad sums stay on their rank, the item block's sums are two more entries of the dict
the ring shifts (:data:`ADAGRAD_ITEM_KEYS`), so they travel with their rows and no rank
ever holds — or all-reduces — a full table of optimizer state. A step's loss is the mean
over its chunk (``scale = steps / n`` of the block), as the one-process step's, so at W = 1
the epoch is :class:`~svdfill.train.row_sparse.RowSparseSolver`'s bit for bit.

Functions of plain tensors: ids are the world's contiguous ids (GLOBAL) on the way in and
block-local after :func:`bucket_by_item_block`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from svdfill.distributed.ring import Ring
from svdfill.kernels.metrics import error_sums

ITEM_KEYS = ("item_factors", "item_bias")
"""The item block's model tables (all that travels for Funk SGD, which keeps no optimizer
state; evaluations send only these)."""

ADAGRAD_ITEM_KEYS = ("item_factors_sum", "item_bias_sum")
"""The item block's Adagrad sums ([I_r, d] and [I_r], float32): they travel with the rows
(and are saved as ``item_*`` block rows, re-blocked by item bounds on load)."""

ADAGRAD_USER_KEYS = ("user_factors_sum", "user_bias_sum")
"""The user block's Adagrad sums: they never leave their rank."""

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One block's ratings: users int64 [n] local to the user block, items int64 [n] local to
the item block, ratings float32 [n]."""


def block_seed(seed: int, phase: str, epoch: int, rank: int, block: int, W: int) -> int:
    """Seed of the shuffle of block (user block ``rank``, item block ``block``) in one epoch;
    at W = 1 it is :func:`svdfill.train.shard.phase_seed` of rank 0 (FunkSGD's)."""
    from svdfill.train.shard import phase_seed

    return phase_seed(seed, phase, epoch, rank * W + block)


def item_block_of(items: torch.Tensor, item_bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The item block (int64 [n]) of each GLOBAL item id in ``items`` (contiguous blocks)."""
    starts = torch.tensor([lo for lo, _ in item_bounds[1:]], dtype=torch.int64,
                          device=items.device)
    return torch.searchsorted(starts, items.to(torch.int64), right=True)


def bucket_by_item_block(users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                         item_bounds: list[tuple[int, int]], u_lo: int) -> list[Block]:
    """This rank's ratings (GLOBAL ``users`` / ``items`` int, ``ratings`` float32 [n], every
    user in this rank's user block starting at ``u_lo``) cut by item block: entry j holds
    block j's ratings with users made local (``u − u_lo``) and items local to block j
    (``i − item_bounds[j][0]``), in their original order (a stable sort)."""
    items = items.to(torch.int64)
    users = users.to(torch.int64)
    owner = item_block_of(items, item_bounds)
    order = torch.sort(owner, stable=True).indices
    counts = torch.bincount(owner, minlength=len(item_bounds)).tolist()
    out, pos = [], 0
    for j, n in enumerate(counts):
        idx = order[pos:pos + n]
        pos += n
        out.append((users[idx] - u_lo, items[idx] - item_bounds[j][0],
                    ratings[idx].to(torch.float32)))
    return out


def block_chunks(block: Block, batch_size: int, seed: int, phase: str, epoch: int,
                 rank: int, j: int, W: int):
    """The steps of block (user block ``rank``, item block ``j``) in one epoch: ``(steps,
    chunks)`` with ``steps = max(1, ceil(n / batch_size))`` and ``chunks`` an iterator of
    ``(users, items, ratings)`` — near-equal slices of one permutation seeded by
    :func:`block_seed` (FunkSGD's / MinibatchSolver's cut of its epoch at W = 1). ``(0, ())``
    for an empty block."""
    users, items, ratings = block
    n = int(users.shape[0])
    if not n:
        return 0, ()
    dev = ratings.device
    steps = max(1, math.ceil(n / batch_size))
    g = torch.Generator(device=dev)
    g.manual_seed(block_seed(seed, phase, epoch, rank, j, W))
    perm = torch.randperm(n, generator=g, device=dev)
    bounds = [(k * n) // steps for k in range(steps + 1)]

    def chunks():
        for k in range(steps):
            idx = perm[bounds[k]:bounds[k + 1]]
            yield users[idx], items[idx], ratings[idx]

    return steps, chunks()


def dsgd_epoch(user_factors: torch.Tensor, user_bias: torch.Tensor,
               item_tables: dict[str, torch.Tensor], blocks: list[Block], ring: Ring, *,
               step: Callable, global_mean: float, lr: float, reg_factors: float,
               reg_bias: float, batch_size: int, seed: int, epoch: int,
               phase: str = "select", progress=None) -> dict[str, torch.Tensor]:
    """One DSGD epoch on rank ``ring.rank`` of ``ring.size``; collective (W shifts).

    user_factors float32 [U_r, d], user_bias [U_r]: this rank's user block, updated in place.
    item_tables: this rank's own item block (``item_factors`` [I_r, d], ``item_bias`` [I_r])
    at the start; returns the same block home again after the epoch (new tensors at W > 1,
    the same ones updated in place at W = 1). blocks: :func:`bucket_by_item_block`'s list.
    step: the signature of :func:`svdfill.kernels.sgd.sgd_step` (from
    :func:`svdfill.kernels.dispatch.training_ops`). Each block's ratings are cut into
    ``max(1, ceil(n / batch_size))`` near-equal steps of one seeded permutation
    (:func:`block_chunks`).
    progress: an optional callable ``(n_steps)`` told after every sub-epoch.
    """
    r, W = ring.rank, ring.size
    held = item_tables
    for s in range(W):
        j = (r + s) % W
        steps, chunks = block_chunks(blocks[j], batch_size, seed, phase, epoch, r, j, W)
        Q, bi = held["item_factors"], held["item_bias"]
        for users, items, ratings in chunks:
            step(user_factors, Q, user_bias, bi, global_mean, users, items, ratings, lr=lr,
                 reg_factors=reg_factors, reg_bias=reg_bias)
        if steps and progress is not None:
            progress(steps)
        held = ring.shift(held)
    return held


def item_side(held: dict[str, torch.Tensor]):
    """The :class:`~svdfill.kernels.row_optim.RowSide` of a held item block with Adagrad
    sums (``item_factors``, ``item_bias``, :data:`ADAGRAD_ITEM_KEYS`), fresh scratch."""
    from svdfill.kernels.row_optim import RowSide

    qs, bs = held["item_factors_sum"], held["item_bias_sum"]
    return RowSide.of(held["item_factors"], held["item_bias"], qs, qs, bs, bs)  # m unused


def dsgd_adagrad_epoch(user_side, item_tables: dict[str, torch.Tensor], blocks: list[Block],
                       ring: Ring, *, accumulate: Callable, apply: Callable,
                       global_mean: float, lr: float, reg_factors: float, reg_bias: float,
                       batch_size: int, seed: int, epoch: int, phase: str = "select",
                       eps: float = 1e-10, progress=None) -> dict[str, torch.Tensor]:
    """:func:`dsgd_epoch` with row-sparse Adagrad steps; collective (W shifts).

    user_side: this rank's user block as a :class:`~svdfill.kernels.row_optim.RowSide`
    (factors, bias and their Adagrad sums, updated in place; its scratch zero). item_tables:
    this rank's own item block, ``item_factors``, ``item_bias`` and the sums
    :data:`ADAGRAD_ITEM_KEYS`: the four travel together; returned home after the epoch.
    accumulate / apply: :func:`~svdfill.kernels.row_optim.accumulate_gradients` and
    :func:`~svdfill.kernels.row_optim.apply_adagrad` or their fused twins
    (:func:`svdfill.kernels.dispatch.training_ops` ``("adagrad", ...)``).

    A step on a chunk of block (r, j) adds the chunk's loss gradient × ``1 / denom`` with
    ``denom = max(n_rj / steps_rj, 1)`` (≈ the mean over the chunk) and moves the touched rows
    of both sides: :class:`~svdfill.train.row_sparse.RowSparseSolver`'s step with the block
    for the epoch. The rate is ``lr`` at every step: Adagrad's own ``lr_decay`` is 0 (as the
    one-process solvers build ``torch.optim.Adagrad``), so its step count never enters the
    update and none is kept (``train.lr_decay`` decays ``lr`` per epoch instead).
    """
    r, W = ring.rank, ring.size
    held = item_tables
    for s in range(W):
        j = (r + s) % W
        n = int(blocks[j][0].shape[0])
        steps, chunks = block_chunks(blocks[j], batch_size, seed, phase, epoch, r, j, W)
        if steps:
            items_side = item_side(held)
            scale = 1.0 / max(n / steps, 1.0)
            for users, items, ratings in chunks:
                accumulate(user_side, items_side, global_mean, users, items, ratings,
                           reg_factors=reg_factors, reg_bias=reg_bias, scale=scale)
                for side in (user_side, items_side):
                    apply(side, lr=lr, step=1, lr_decay=0.0, eps=eps)
            if progress is not None:
                progress(steps)
        held = ring.shift(held)
    return held


@torch.no_grad()
def ring_error_sums(user_factors: torch.Tensor, user_bias: torch.Tensor,
                    item_tables: dict[str, torch.Tensor], blocks: list[Block], ring: Ring, *,
                    global_mean: float, chunk: int = 1 << 20) -> torch.Tensor:
    """float64 [3] = (Σ e², Σ |e|, n) over this rank's ``blocks`` (as
    :func:`bucket_by_item_block` cuts them), the item blocks visiting by ``ring`` (W shifts,
    home again at the end). Not summed over ranks: the caller all-reduces."""
    r, W = ring.rank, ring.size
    sums = torch.zeros(3, dtype=torch.float64, device=user_factors.device)
    held = item_tables
    for s in range(W):
        users, items, ratings = blocks[(r + s) % W]
        Q, bi = held["item_factors"], held["item_bias"]
        pending = ring.start_shift(held)  # read only here: it moves on while it is used
        for a in range(0, int(users.shape[0]), chunk):
            u, i = users[a:a + chunk], items[a:a + chunk]
            pred = (global_mean + user_bias.index_select(0, u) + bi.index_select(0, i)
                    + (user_factors.index_select(0, u) * Q.index_select(0, i)).sum(1))
            sums += error_sums(pred, ratings[a:a + chunk])
        held = pending.wait()
    return sums
