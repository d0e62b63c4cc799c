"""Alternating least squares for explicit-rating biased MF, batched on the model's device.

The model is r̂(u, i) = μ + b_u + b_i + p_u·q_i with μ fixed at the global mean. With the
item side held fixed, each user's [p_u, b_u] is the solution of a ridge regression of the
residual r − μ − b_i on the features [q_i, 1] of the items that user rated::

    (Zᵤᵀ Zᵤ + diag(λ_f·nᵤ^α, …, λ_f·nᵤ^α, λ_b·nᵤ^β)) [p_u; b_u] = Zᵤᵀ (r − μ − b_i)

and symmetrically for items. By default the penalty of a row grows with its number of
ratings nᵤ (``λ_f·nᵤ`` on the factors, ``λ_b·nᵤ`` on the bias) — Spark ALS's "weighted-λ" for
explicit feedback — which makes ``λ`` mean the same thing as the per-rating L2 weight of
Funk/Surprise SGD: both minimise ``Σ_(u,i) (r − r̂)² + λ_f(‖p_u‖² + ‖q_i‖²) + λ_b(b_u² + b_i²)``.
``reg_exponent``/``bias_reg_exponent`` generalise this to ``λ_f·nᵤ^α`` and ``λ_b·nᵤ^β``.

Batching: rows (users, then items) are sorted by rating count and cut into chunks of
similar count whose padded gather ``[segments, L, d+1]`` fits a memory budget, so the normal
equations of a chunk are one ``bmm`` and its solves one batched Cholesky. A row with more
ratings than one padded segment may hold is split into several segments whose Gram
matrices are summed with ``index_add_``: no row is too long for the budget, and no
``[n, d+1, d+1]`` tensor of per-rating outer products is ever built.

The sort and the chunk index tensors depend only on (users, items); they are built once
and reused by later sweeps over the same, unmodified index tensors (the trainer passes the
same ones every epoch).

The one-process solves (and the Gibbs draws) gather ``[q_i, 1, b_i]`` per rating and form the
augmented Gram ``[Z, y]ᵀ[Z, y]`` in one ``bmm`` (``ZᵀZ``, ``Zᵀy`` and ``yᵀy`` together), chunk by
chunk into one buffer per *group* of chunks (:func:`side_groups`, within the budget; one group
per side on MovieLens-1M), which is then solved by one batched Cholesky with one host sync.
On a CPU the large temporaries live in a per-side, per-thread workspace
(:func:`side_workspace`): fresh tensors are fresh pages, and faulting them in cost more than
the gather itself on the 2-core box.

Item-sharded worlds (``user_sum`` given): each rank holds the ratings of its own items, so
its item solves are local, while a user's normal equations are the sum of every rank's
part. Users are then solved in blocks of consecutive ids, the same blocks on every rank:
each rank builds its partial Grams of a block, ``user_sum`` adds them up across ranks (an
all-reduce of ``block × (d+1)²`` floats), and every rank solves the same summed systems with
the global rating counts, so the replicated user table stays identical everywhere — the
block ALS of Spark's explicit-feedback solver with the user side's partial sums
all-reduced instead of shuffled.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

DEFAULT_BUDGET_ELEMENTS = 1 << 24
"""Default cap on the elements of one chunk's gathered features (64 MiB of float32): the
budget on CPU (sized for its caches), and the user-block size of item-sharded sweeps on
every device (ranks must cut the same blocks)."""

MAX_CUDA_BUDGET_ELEMENTS = 1 << 28
"""Upper end of the CUDA default (1 GiB of gathered float32 features per chunk)."""

_DEVICE_BUDGET: dict[str, int] = {}


def default_budget_elements(device: torch.device | str) -> int:
    """The chunk budget (elements) when ``budget_elements`` is not given: on CPU
    :data:`DEFAULT_BUDGET_ELEMENTS` (cache-sized; CPU results do not depend on the device
    memory). On CUDA a sixteenth of the free memory at the first call (a chunk's gather,
    targets and Grams take about three budgets of float32), between the CPU budget and
    :data:`MAX_CUDA_BUDGET_ELEMENTS`: fewer, larger chunks, each with its host syncs.
    Cached per device, so every sweep of a run reuses one plan."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_BUDGET_ELEMENTS
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _DEVICE_BUDGET:
        free, _ = torch.cuda.mem_get_info(device)
        _DEVICE_BUDGET[key] = int(min(MAX_CUDA_BUDGET_ELEMENTS,
                                      max(DEFAULT_BUDGET_ELEMENTS, free // 4 // 16)))
    return _DEVICE_BUDGET[key]

_PAD_RATIO = 1.25
"""Rows of one chunk have counts within this ratio, so padding wastes at most ~20%."""
_MIN_WIDTH = 16
"""Rows shorter than this share chunks regardless of the ratio (padding there is cheap)."""


@torch.no_grad()
def als_sweep(
    model: torch.nn.Module,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    *,
    reg_factors: float,
    reg_bias: float,
    reg_exponent: float = 1.0,
    bias_reg_exponent: float = 1.0,
    budget_elements: int | None = None,
    user_sum: Callable[[torch.Tensor], object] | None = None,
    user_counts: torch.Tensor | None = None,
) -> None:
    """One ALS sweep in place: solve every user given the items, then every item given the
    (new) users.

    Args:
        model: a :class:`svdfill.kernels.model.BiasedMF` (parameters ``user_factors [U, d]``,
            ``item_factors [I, d]``, ``user_bias [U]``, ``item_bias [I]``, buffer
            ``global_mean`` 0-d), float32, on the device where the work runs.
        users: int32/int64 ``[n]`` row indices into ``user_factors``.
        items: int32/int64 ``[n]`` row indices into ``item_factors`` (local to the model's
            item table when it holds a shard).
        ratings: float32 ``[n]``.
        reg_factors: λ_f ≥ 0, the L2 weight on p_u and q_i.
        reg_bias: λ_b ≥ 0, the L2 weight on b_u and b_i.
        reg_exponent: α in the factor penalty ``λ_f · n^α`` of a row with ``n`` ratings.
            1 (default) is Spark's weighted-λ, the same objective as per-rating SGD
            regularization; 0 is a plain ridge penalty; in between shrinks rows with few
            ratings relatively more.
        bias_reg_exponent: β in the bias penalty ``λ_b · n^β`` (1 = per rating, 0 = a fixed
            shrinkage of every bias by ``λ_b`` as in Koren's baseline estimates).
        budget_elements: cap on the elements of one chunk's gathered features; ``None`` uses
            :func:`default_budget_elements` of the model's device (CPU:
            :data:`DEFAULT_BUDGET_ELEMENTS`).
        user_sum: for an item-sharded world, an in-place sum over the ranks (e.g.
            ``World.all_reduce_sum``) of a float tensor; every rank must call ``als_sweep``
            with the same ``n_users``, ``d`` and ``budget_elements`` (the user blocks pair
            up; ``None`` cuts them by :data:`DEFAULT_BUDGET_ELEMENTS` on every device), and
            then holds the same user rows. ``None``: the ratings are all there is.
        user_counts: with ``user_sum``, each user's rating count over all ranks, ``[U]``
            (any dtype); it weighs the user penalties and says which users have ratings.

    Users or items with no rating here keep their current values (the SGD trainer never
    touches them either), so a sweep over any subset of the ratings is well defined.
    Raises ``ValueError`` on mismatched shapes, out-of-range ids or negative λ, and
    ``FloatingPointError`` when a solution is not finite (NaN/inf in the inputs).
    """
    if users.dim() != 1 or users.shape != items.shape or users.shape != ratings.shape:
        raise ValueError(
            f"als_sweep: users, items and ratings must be 1-d of one length, got "
            f"{tuple(users.shape)}, {tuple(items.shape)}, {tuple(ratings.shape)}"
        )
    if reg_factors < 0 or reg_bias < 0:
        raise ValueError(f"als_sweep: regularization must be >= 0, got {reg_factors}, {reg_bias}")
    if not (0.0 <= reg_exponent <= 2.0 and 0.0 <= bias_reg_exponent <= 2.0):
        raise ValueError(f"als_sweep: regularization exponents must lie in [0, 2], got "
                         f"{reg_exponent}, {bias_reg_exponent}")
    if users.numel() == 0 and user_sum is None:
        return
    if budget_elements is not None and int(budget_elements) < 1:
        raise ValueError(f"als_sweep: budget_elements must be >= 1, got {int(budget_elements)}")
    if (user_sum is None) != (user_counts is None):
        raise ValueError("als_sweep: user_sum and user_counts go together")
    uf, itf = model.user_factors.data, model.item_factors.data
    ub, ib = model.user_bias.data, model.item_bias.data
    dev, dtype = uf.device, uf.dtype
    budget = default_budget_elements(dev) if budget_elements is None else int(budget_elements)
    n_users, n_items, d = uf.shape[0], itf.shape[0], uf.shape[1]
    plan = rating_plan(users, items, n_users, n_items, d + 1, dev, budget)
    centered = ratings.to(dev, dtype) - model.global_mean.to(dev, dtype)
    # One trailing zero so padded slots (index n) contribute nothing.
    centered = torch.cat([centered, centered.new_zeros(1)])
    reg = (float(reg_factors), float(reg_bias), float(reg_exponent), float(bias_reg_exponent))
    if user_sum is None:
        _solve_side(uf, ub, itf, ib, centered, plan.user_side, reg, budget)
    else:
        if user_counts.shape != (n_users,):
            raise ValueError(f"als_sweep: user_counts must be [{n_users}], got "
                             f"{tuple(user_counts.shape)}")
        # the block cut is a collective's shape: the same on every rank, whatever its memory
        agreed = DEFAULT_BUDGET_ELEMENTS if budget_elements is None else budget
        blocks = user_blocks(plan, users, items, n_users, d + 1, dev, budget, block_budget=agreed)
        _solve_users_summed(uf, ub, itf, ib, centered, blocks, reg, budget, user_sum,
                            user_counts.to(dev, dtype))
    _solve_side(itf, ib, uf, ub, centered, plan.item_side, reg, budget)


# -- plan: the sort and the padded index tensors, built once per (users, items) ---------------

@dataclass
class _Chunk:
    rows: torch.Tensor  # int64 [B] rows solved together
    weight: torch.Tensor  # float [B] rating count per row (for weighted λ)
    cols: torch.Tensor  # int32/64 [S, L] column ids, padded with C (a zero feature row)
    pos: torch.Tensor  # int32/64 [S, L] positions in the ratings, padded with n (a zero target)
    seg_row: torch.Tensor | None  # int64 [S] row of each segment when S > B, else None


@dataclass
class _Side:
    n_cols: int
    chunks: list[_Chunk]
    groups: dict | None = None  # (k, budget) -> side_groups(), built on first use
    workspace: dict | None = None  # thread id -> reusable CPU buffers (side_workspace)


@dataclass
class _Group:
    """Consecutive chunks whose systems are solved (or drawn) together: one batched
    Cholesky, one noise draw and one host sync per group instead of per chunk."""

    chunks: list[_Chunk]
    rows: torch.Tensor  # int64 [B] the chunks' rows, concatenated
    weight: torch.Tensor  # [B] their rating counts


@dataclass
class _Plan:
    user_side: _Side
    item_side: _Side
    user_blocks: list[tuple[int, int, _Side]] | None = None  # built by user_blocks()


_cache: dict = {}


def rating_plan(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, k: int,
                dev: torch.device, budget: int = DEFAULT_BUDGET_ELEMENTS) -> _Plan:
    """The padded per-row index tensors of both sides for rows of ``k`` unknowns, built on
    ``dev`` (cached for the last ``(users, items)`` pair while both tensors live and are
    unmodified). Shared by the ALS solves and the Gibbs sampler (:mod:`svdfill.kernels.gibbs`).
    Raises ``ValueError`` on ids outside ``[0, n_users)`` / ``[0, n_items)``."""
    key = (id(users), id(items), users._version, items._version, users.numel(), n_users,
           n_items, k, str(dev), budget)
    hit = _cache.get("key")
    if hit == key and _cache["users"]() is users and _cache["items"]() is items:
        return _cache["plan"]
    u = users.to(dev, torch.int64)
    i = items.to(dev, torch.int64)
    for name, ids, bound in (("users", u, n_users), ("items", i, n_items)):
        if ids.numel() == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"als_sweep: {name} ids must lie in [0, {bound}), got [{lo}, {hi}]")
    plan = _Plan(_build_side(u, i, n_users, n_items, k, budget),
                 _build_side(i, u, n_items, n_users, k, budget))
    _cache.clear()
    # The plan lives as long as the index tensors it was built for: when either dies, the
    # callback drops it, so a finished training run leaves no memory behind.
    _cache.update(key=key, users=weakref.ref(users, _drop_plan), items=weakref.ref(items, _drop_plan),
                  plan=plan)
    return plan


def _drop_plan(_ref) -> None:
    _cache.clear()


def user_block_rows(k: int, budget: int) -> int:
    """Users per block of the summed (item-sharded) user solve: the block's Grams
    ``[rows, k, k]`` stay within ``budget`` elements. Depends on nothing but its arguments,
    so every rank cuts the same blocks."""
    return max(1, budget // (k * k))


def user_blocks(plan: _Plan, users: torch.Tensor, items: torch.Tensor, n_users: int, k: int,
                dev: torch.device, budget: int, *, block_budget: int | None = None
                ) -> list[tuple[int, int, _Side]]:
    """``(lo, hi, side)`` for consecutive user-id blocks covering ``[0, n_users)`` —
    :func:`user_block_rows` users each (of ``block_budget``, default ``budget``; it must be
    the same on every rank), the last one ragged — where ``side`` holds this rank's ratings
    of users ``lo..hi-1`` (rows made block-local, positions still into the whole ratings,
    chunked by ``budget``); built once per plan."""
    if plan.user_blocks is None:
        u = users.to(dev, torch.int64)
        i = items.to(dev, torch.int64)
        step = user_block_rows(k, budget if block_budget is None else block_budget)
        blocks = []
        for lo in range(0, n_users, step):
            hi = min(n_users, lo + step)
            if lo == 0 and hi == n_users:
                blocks.append((lo, hi, plan.user_side))  # one block: the plan's own side
                continue
            where = torch.nonzero((u >= lo) & (u < hi)).squeeze(1)
            blocks.append((lo, hi, _build_side(u[where] - lo, i[where], hi - lo,
                                               plan.user_side.n_cols, k, budget,
                                               positions=where, n_total=u.numel())))
        plan.user_blocks = blocks
    return plan.user_blocks


def _build_side(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, k: int,
                budget: int, positions: torch.Tensor | None = None, n_total: int | None = None
                ) -> _Side:
    """The chunks of one side. ``positions`` (int64 [n]) maps the given ratings to their
    places in a larger array of ``n_total`` (whose trailing slot ``n_total`` is the padding);
    ``None``: the ratings are that array."""
    dev = rows.device
    n = rows.numel()
    pad = n if n_total is None else int(n_total)
    # ratings grouped by user in id order (MovieLens-1M, the synthetic generator, a split of
    # either) need no sort for the user side: a check instead of seconds of argsort on 100M
    in_order = n < 2 or bool((rows[1:] >= rows[:-1]).all())
    order = None if in_order else torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=n_rows)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=indptr[1:])
    counts_np = counts.cpu().numpy()
    active = np.flatnonzero(counts_np)
    # Ascending count keeps rows of similar length together, so padding wastes little.
    active = active[np.argsort(counts_np[active], kind="stable")]
    seg_cap = max(1, budget // k)
    # int32 indices halve the plan's memory whenever the ids fit
    idx_dtype = torch.int32 if max(pad, n_cols) < 2**31 - 1 else torch.int64
    chunks = []
    # Padded slots point at position n (zero target) and column n_cols (zero features).
    # Both tables are built in their final dtype, one pass each (no int64 copy, no cat).
    order_ext = torch.empty(n + 1, dtype=idx_dtype, device=dev)
    cols_ext = torch.empty(n + 1, dtype=idx_dtype, device=dev)
    if positions is None:
        if order is None:
            torch.arange(n, out=order_ext[:n])
        else:
            order_ext[:n] = order
    else:
        order_ext[:n] = positions if order is None else positions[order]
    cols_ext[:n] = cols if order is None else cols[order]
    order_ext[n], cols_ext[n] = pad, n_cols
    del order
    for lo, hi in _chunks(counts_np[active], seg_cap, k, budget):
        chunk = torch.from_numpy(active[lo:hi]).to(dev)
        c = counts[chunk]
        nseg = (c + seg_cap - 1) // seg_cap
        seg_row = torch.repeat_interleave(torch.arange(chunk.numel(), device=dev), nseg)
        first = torch.cumsum(nseg, 0) - nseg
        seg_j = torch.arange(seg_row.numel(), device=dev) - first[seg_row]
        seg_start = indptr[chunk][seg_row] + seg_j * seg_cap
        seg_len = torch.clamp(c[seg_row] - seg_j * seg_cap, max=seg_cap)
        width = int(min(int(counts_np[active[hi - 1]]), seg_cap))
        offs = torch.arange(width, device=dev)
        sorted_idx = torch.where(offs[None, :] < seg_len[:, None], seg_start[:, None] + offs[None, :],
                                 torch.full((), n, dtype=torch.int64, device=dev))
        chunks.append(_Chunk(rows=chunk, weight=c, cols=cols_ext[sorted_idx],
                             pos=order_ext[sorted_idx],
                             seg_row=seg_row if seg_row.numel() != chunk.numel() else None))
    return _Side(n_cols=n_cols, chunks=chunks)


def _chunks(sorted_counts: np.ndarray, seg_cap: int, k: int, budget: int):
    """Yield ``[lo, hi)`` ranges over rows sorted by ascending count such that the padded
    gather (segments × widest segment × k) and the chunk's Gram matrices (rows × k × k)
    stay within ``budget`` elements, and counts within a chunk differ by at most
    :data:`_PAD_RATIO` (always at least one row per chunk)."""
    nseg = -(-sorted_counts // seg_cap)
    seg_cum = np.concatenate([[0], np.cumsum(nseg)])
    width = np.minimum(sorted_counts, seg_cap)
    n = sorted_counts.size
    max_rows = max(1, budget // (k * k))
    lo = 0
    while lo < n:
        max_width = max(_MIN_WIDTH, int(width[lo] * _PAD_RATIO))

        def fits(hi: int) -> bool:
            w = int(width[hi - 1])
            return ((seg_cum[hi] - seg_cum[lo]) * w * k <= budget and hi - lo <= max_rows
                    and w <= max_width)

        # every condition is monotone in hi: bisect for the largest hi that fits
        a, b = lo + 1, min(n, lo + max_rows)
        while a < b:
            m = (a + b + 1) // 2
            if fits(m):
                a = m
            else:
                b = m - 1
        yield lo, a
        lo = a


def side_groups(side: _Side, k: int, budget: int) -> list[_Group]:
    """The side's chunks cut into groups whose ``[B, k+1, k+1]`` augmented systems stay within
    ``budget`` elements (at least one chunk each); cached on the side. A chunk already holds
    at most ``budget // k²`` rows, so on MovieLens-1M each side is one group: the per-chunk
    costs (a LAPACK batch, a host sync, a noise call, a scatter) are paid once a sweep."""
    key = (int(k), int(budget))
    if side.groups is None:
        side.groups = {}
    if key not in side.groups:
        cap = max(1, budget // ((k + 1) * (k + 1)))
        groups, cur, size = [], [], 0
        for ch in side.chunks:
            m = ch.rows.numel()
            if cur and size + m > cap:
                groups.append(cur)
                cur, size = [], 0
            cur.append(ch)
            size += m
        if cur:
            groups.append(cur)
        side.groups[key] = [_Group(g, torch.cat([c.rows for c in g]), torch.cat([c.weight for c in g]))
                            for g in groups]
    return side.groups[key]


def side_workspace(side: _Side, device: torch.device) -> dict | None:
    """Reusable buffers for the sweeps over ``side`` on a CPU (``None`` elsewhere: the CUDA
    caching allocator already reuses memory), one set per thread (threads may stand in for
    ranks) and as long-lived as the plan. Why: on the CPU every large tensor is fresh
    ``mmap``-ed memory whose pages fault in on first touch; measured on the 2-core box, a
    900k × 18 gather took 200 ms into a new tensor and 58 ms into a reused one."""
    if torch.device(device).type != "cpu":
        return None
    if side.workspace is None:
        side.workspace = {}
    return side.workspace.setdefault(threading.get_ident(), {})


def buffer(ws: dict | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device: a view of
    the workspace's buffer ``name`` (grown when too small), or a new tensor without one.
    A name's previous contents are overwritten: callers give each live buffer its own."""
    if ws is None:
        return like.new_empty(shape)
    n = 1
    for s in shape:
        n *= int(s)
    buf = ws.get(name)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(max(n, 1))
        ws[name] = buf
    return buf[:n].view(shape)


def group_equations(feats_aug: torch.Tensor, centered: torch.Tensor, group: _Group,
                    budget: int, ws: dict | None = None) -> torch.Tensor:
    """The augmented normal equations ``[B, k+1, k+1]`` of a group's rows (in ``group.rows``
    order): :func:`chunk_augmented_equations` of each chunk written into one buffer (the
    workspace's ``"aug"`` with ``ws``)."""
    kk = feats_aug.shape[1]
    out = buffer(ws, "aug", (group.rows.numel(), kk, kk), feats_aug)
    at = 0
    for ch in group.chunks:
        m = ch.rows.numel()
        chunk_augmented_equations(feats_aug, centered, ch, budget, out=out[at:at + m], ws=ws)
        at += m
    return out


# -- the solves --------------------------------------------------------------------------------

def _solve_side(factors, bias, fixed_factors, fixed_bias, centered, side: _Side,
                reg: tuple[float, float, float, float], budget: int) -> None:
    """Overwrite ``factors [R, d]``/``bias [R]`` of the side's rows with their ridge solutions
    given ``fixed_factors [C, d]``/``fixed_bias [C]``; ``centered [n+1]`` = ratings − μ, 0."""
    k = fixed_factors.shape[1] + 1
    feats_aug = side_features_augmented(fixed_factors, fixed_bias)
    ws = side_workspace(side, factors.device)
    for group in side_groups(side, k, budget):
        aug = group_equations(feats_aug, centered, group, budget, ws)
        _solve_rows(factors, bias, group.rows, aug[:, :k, :k], aug[:, :k, k:], group.weight, reg)


def _solve_rows(factors, bias, rows: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor,
                n: torch.Tensor, reg: tuple[float, float, float, float]) -> None:
    """Overwrite ``rows`` of ``factors``/``bias`` with the solutions of their normal
    equations ``gram [B, k, k]``, ``rhs [B, k, 1]`` (``gram`` changed in place) under the
    penalties of rows with ``n [B]`` ratings."""
    d = factors.shape[1]
    reg_factors, reg_bias, alpha, beta = reg
    n = n.to(factors.dtype)
    diag = gram.diagonal(dim1=1, dim2=2)
    diag[:, :d] += (reg_factors * n.pow(alpha))[:, None]
    diag[:, d] += reg_bias * n.pow(beta)
    sol = _spd_solve(gram, rhs)[..., 0]
    factors[rows] = sol[:, :d]
    bias[rows] = sol[:, d]


def _solve_users_summed(factors, bias, fixed_factors, fixed_bias, centered,
                        blocks: list[tuple[int, int, _Side]],
                        reg: tuple[float, float, float, float], budget: int,
                        user_sum: Callable[[torch.Tensor], object], counts: torch.Tensor) -> None:
    """The user side of an item-sharded sweep: the summed normal equations of each block
    (:func:`summed_user_equations`), regularized with the global ``counts [U]`` and solved
    (the same systems, hence the same rows, on every rank)."""
    feats, fbias = side_features(fixed_factors, fixed_bias)
    for rows, gram, rhs in summed_user_equations(feats, fbias, centered, blocks, user_sum,
                                                 counts, budget):
        _solve_rows(factors, bias, rows, gram, rhs, counts[rows], reg)


def summed_user_equations(feats: torch.Tensor, fbias: torch.Tensor, centered: torch.Tensor,
                          blocks: list[tuple[int, int, _Side]],
                          user_sum: Callable[[torch.Tensor], object], counts: torch.Tensor,
                          budget: int):
    """Yield ``(rows int64 [B], gram [B, k, k], rhs [B, k, 1])`` block by block of
    :func:`user_blocks`: the unregularized normal equations of the users with
    ``counts [U] > 0``, this rank's part summed over the ranks by ``user_sum`` (a collective:
    every rank iterates over every block). Shared by the ALS solves and the Gibbs draws."""
    k = feats.shape[1]
    for lo, hi, side in blocks:
        gram = feats.new_zeros(hi - lo, k, k)
        rhs = feats.new_zeros(hi - lo, k, 1)
        for ch in side.chunks:
            g, r = chunk_normal_equations(feats, fbias, centered, ch, budget)
            gram.index_add_(0, ch.rows, g)
            rhs.index_add_(0, ch.rows, r)
        user_sum(gram)
        user_sum(rhs)
        rows = torch.nonzero(counts[lo:hi] > 0).squeeze(1)
        if rows.numel():
            yield lo + rows, gram[rows], rhs[rows]


def side_features(fixed_factors: torch.Tensor, fixed_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``feats [C+1, d+1]`` = ``[q_i, 1]`` per column of the fixed side (the constant carries
    the solved row's own bias) and ``fbias [C+1]`` = ``b_i``, each with a zero row at ``C``
    that padded slots gather."""
    c, d = fixed_factors.shape
    feats = fixed_factors.new_zeros(c + 1, d + 1)
    feats[:-1, :d] = fixed_factors
    feats[:-1, d] = 1.0
    return feats, torch.cat([fixed_bias, fixed_bias.new_zeros(1)])


def side_features_augmented(fixed_factors: torch.Tensor, fixed_bias: torch.Tensor) -> torch.Tensor:
    """``[C+1, d+2]`` = ``[q_i, 1, b_i]`` per column of the fixed side with a zero row at ``C``
    (padded slots): :func:`side_features` and its bias in one table, so that one gather
    fetches both."""
    c, d = fixed_factors.shape
    feats = fixed_factors.new_zeros(c + 1, d + 2)
    feats[:-1, :d] = fixed_factors
    feats[:-1, d] = 1.0
    feats[:-1, d + 1] = fixed_bias
    return feats


def chunk_augmented_equations(feats_aug: torch.Tensor, centered: torch.Tensor, ch: _Chunk,
                              budget: int, out: torch.Tensor | None = None,
                              ws: dict | None = None) -> torch.Tensor:
    """The normal equations of a chunk's rows as one augmented Gram ``[B, k+1, k+1]`` =
    ``[Z, y]ᵀ[Z, y]``: ``[:, :k, :k]`` is ``ZᵀZ``, ``[:, :k, k]`` is ``Zᵀy`` and ``[:, k, k]``
    is ``yᵀy``, with ``Z`` the first ``k`` columns of the gathered ``feats_aug``
    (:func:`side_features_augmented`) and ``y = centered − b``. One gather and one ``bmm``
    per segment batch (instead of a second gather and a matrix-vector ``bmm`` that reads the
    gathered features again). ``out``: a contiguous ``[B, k+1, k+1]`` buffer to fill; ``ws``:
    a :func:`side_workspace` for the gathers."""
    if ch.seg_row is None:
        return _augmented_equations(feats_aug, centered, ch.cols, ch.pos, out, ws)
    kk = feats_aug.shape[1]
    if out is None:
        out = feats_aug.new_zeros(ch.rows.numel(), kk, kk)
    else:
        out.zero_()
    step = max(1, budget // (ch.cols.shape[1] * kk))
    for s in range(0, ch.cols.shape[0], step):
        g = _augmented_equations(feats_aug, centered, ch.cols[s:s + step], ch.pos[s:s + step],
                                 ws=ws, out_name="seg")
        out.index_add_(0, ch.seg_row[s:s + step], g)
    return out


def _augmented_equations(feats_aug, centered, cols, pos, out=None, ws=None, out_name=None):
    """``[Z, y]ᵀ[Z, y]`` ``[S, k+1, k+1]`` of padded segments (padding gathers zeros);
    gathers into the workspace ``ws`` when given (and the result too, with ``out_name``)."""
    kk = feats_aug.shape[1]
    x = buffer(ws, "gather", (cols.numel(), kk), feats_aug)
    torch.index_select(feats_aug, 0, cols.reshape(-1), out=x)
    x = x.view(*cols.shape, kk)  # [S, L, k+1]
    c = buffer(ws, "target", (pos.numel(),), centered)
    torch.index_select(centered, 0, pos.reshape(-1), out=c)
    y = x[..., kk - 1]  # the gathered b, turned into y = centered − b in place (one pass)
    torch.sub(c.view(cols.shape), y, out=y)
    xt = x.transpose(1, 2)
    if out is None and out_name is not None and ws is not None:
        out = buffer(ws, out_name, (cols.shape[0], kk, kk), feats_aug)
    if out is None:
        return torch.bmm(xt, x)
    return torch.bmm(xt, x, out=out)


def chunk_normal_equations(feats: torch.Tensor, fbias: torch.Tensor, centered: torch.Tensor,
                           ch: _Chunk, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unregularized normal equations of a chunk's rows: Gram ``Zᵀ Z`` ``[B, k, k]`` and
    ``Zᵀ y`` ``[B, k, 1]`` with ``Z`` the gathered ``feats`` and ``y = centered − fbias``
    (``centered [n+1]`` = ratings − μ with a trailing 0 for padded slots)."""
    if ch.seg_row is None:
        return _normal_equations(feats, fbias, centered, ch.cols, ch.pos)
    # rows longer than one segment: sum segment Grams, a budget's worth at a time
    b, k = ch.rows.numel(), feats.shape[1]
    gram = feats.new_zeros(b, k, k)
    rhs = feats.new_zeros(b, k, 1)
    step = max(1, budget // (ch.cols.shape[1] * k))
    for s in range(0, ch.cols.shape[0], step):
        g, r = _normal_equations(feats, fbias, centered, ch.cols[s:s + step], ch.pos[s:s + step])
        gram.index_add_(0, ch.seg_row[s:s + step], g)
        rhs.index_add_(0, ch.seg_row[s:s + step], r)
    return gram, rhs


def _normal_equations(feats, fbias, centered, cols, pos):
    """Gram ``[S, k, k]`` and right-hand side ``[S, k, 1]`` of padded segments."""
    # index_select on the flattened ids: about twice as fast as advanced indexing here
    flat = cols.reshape(-1)
    x = feats.index_select(0, flat).view(*cols.shape, feats.shape[1])  # [S, L, k]
    y = (centered.index_select(0, pos.reshape(-1)) - fbias.index_select(0, flat)).view(cols.shape)
    xt = x.transpose(1, 2)
    return torch.bmm(xt, x), torch.bmm(xt, y.unsqueeze(2))


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve the batch of symmetric positive (semi)definite systems ``a x = b``
    (``a [B, k, k]``, ``b [B, k, 1]``) by Cholesky; systems that are not positive definite
    (λ = 0 with fewer ratings than unknowns) get the minimum-norm least-squares solution."""
    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b, chol)
    bad = info != 0
    # one host sync for both checks (on CUDA each costs a round trip per chunk): any failed
    # Cholesky, and any non-finite solution among the rows that did not fail
    finite = torch.isfinite(x).flatten(1).all(1)
    any_bad, any_nonfinite = torch.stack([bad.any(), (~finite & ~bad).any()]).tolist()
    if any_bad:
        x[bad] = torch.linalg.pinv(a[bad], hermitian=True) @ b[bad]
        any_nonfinite = any_nonfinite or not bool(torch.isfinite(x[bad]).all())
    if any_nonfinite:
        raise FloatingPointError("als_sweep: non-finite solution (NaN/inf in ratings or factors?)")
    return x
