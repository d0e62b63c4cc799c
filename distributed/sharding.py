"""Balanced contiguous item shards.

Rank ``r`` of ``W`` owns the items ``[lo_r, hi_r)``; shards are contiguous so a shard's
item table is a slice of the full one and ``fill_topk(..., item_offset=lo_r)`` reports
global item ids directly. Cuts are chosen so the largest shard carries as few ratings as
possible (the slowest rank sets the pace of every synchronous step).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_counts(counts) -> np.ndarray:
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if c.ndim != 1:
        raise ValueError(f"item counts must be 1-D, got shape {tuple(c.shape)}")
    c = c.astype(np.int64, copy=False)
    if c.size and c.min() < 0:
        raise ValueError("item counts must be non-negative")
    return c


def _greedy_cuts(prefix: np.ndarray, n_shards: int, cap: int) -> list[int] | None:
    """End of each shard when every shard takes as many items as fit under ``cap``
    (but leaves at least one item for each later shard); ``None`` when ``cap`` is too small."""
    n = prefix.size - 1
    cuts, start = [], 0
    for r in range(n_shards):
        left = n_shards - r - 1
        if r == n_shards - 1:
            end = n
        else:
            # last index j with prefix[j] - prefix[start] <= cap
            end = int(np.searchsorted(prefix, prefix[start] + cap, side="right")) - 1
            end = max(min(end, n - left), start + 1)
        if prefix[end] - prefix[start] > cap:
            return None
        cuts.append(end)
        start = end
    return cuts


def balanced_shards(counts, world_size: int) -> list[tuple[int, int]]:
    """``world_size`` contiguous, non-empty shards ``[(lo, hi), ...]`` covering all items.

    ``counts``: int [I] ratings per item (numpy or torch). The cuts minimise the largest
    shard's rating count (the optimal contiguous partition: binary search on the bottleneck
    with a greedy feasibility check, O(W log I log N)). Deterministic: every rank computes
    the same shards from the same counts.
    """
    c = _as_counts(counts)
    n = c.size
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > n:
        raise ValueError(f"cannot split {n} items into {world_size} non-empty shards")
    prefix = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(c, out=prefix[1:])
    total = int(prefix[-1])
    lo = max(int(c.max()) if n else 0, -(-total // world_size))
    hi = total
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy_cuts(prefix, world_size, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return _even_cuts(prefix, world_size, lo)


def _even_cuts(prefix: np.ndarray, n_shards: int, cap: int) -> list[tuple[int, int]]:
    """Cuts near each equal share of what is left, under the optimal bottleneck ``cap``
    (the greedy cuts reach that bottleneck too, but pile the slack into the first shards)."""
    n = prefix.size - 1
    out, start = [], 0
    for r in range(n_shards):
        left = n_shards - r - 1
        if left == 0:
            out.append((start, n))
            break
        target = prefix[start] + (prefix[-1] - prefix[start]) / (left + 1)
        j = int(np.searchsorted(prefix, target, side="right")) - 1
        cands = sorted({j, j + 1}, key=lambda e: (abs(prefix[min(max(e, 0), n)] - target), e))
        greedy = _greedy_cuts(prefix[start:] - prefix[start], left + 1, cap)
        assert greedy is not None
        end = start + greedy[0]
        for e in cands:
            e = min(max(e, start + 1), n - left)
            if prefix[e] - prefix[start] <= cap and \
                    _greedy_cuts(prefix[e:] - prefix[e], left, cap) is not None:
                end = e
                break
        out.append((start, end))
        start = end
    return out


def even_shards(n_items: int, world_size: int) -> list[tuple[int, int]]:
    """Equal-size contiguous shards (the fill's cost is per item, not per rating)."""
    return balanced_shards(np.ones(n_items, dtype=np.int64), world_size)


ITEM_SPLITS = ("auto", "replicate", "shard")
REPLICATE_ITEMS_MAX_BYTES = 512 << 20
"""``item_split = "auto"`` replicates an item table (float32 Q and b_i) up to this size."""


def fill_item_shards(n_items: int, factors: int, world_size: int,
                     split: str = "auto") -> list[tuple[int, int]]:
    """The items each of the ``world_size`` fill workers holds: ``[(lo, hi), …]``.

    ``shard``: equal contiguous shards; every block's top-k is then computed by all W and
    merged, which costs W selections and a gather of W lists per block — the price of an
    item table too big for one worker. ``replicate``: every worker holds all items
    (``(0, n_items)`` W times) and fills its own users alone: no traffic per block and one
    selection per user. ``auto`` replicates when the table is at most
    :data:`REPLICATE_ITEMS_MAX_BYTES` (4·n_items·(factors + 1) bytes), shards otherwise.
    """
    if split not in ITEM_SPLITS:
        raise ValueError(f"item split {split!r}: expected one of {', '.join(ITEM_SPLITS)}")
    table = 4 * int(n_items) * (int(factors) + 1)
    if split == "replicate" or (split == "auto" and table <= REPLICATE_ITEMS_MAX_BYTES):
        return [(0, int(n_items))] * world_size
    return even_shards(n_items, world_size)


def is_replicated(shards: list[tuple[int, int]], n_items: int) -> bool:
    """Every worker holds every item (and W > 1 or not, no merge is needed)."""
    return all(int(lo) == 0 and int(hi) == int(n_items) for lo, hi in shards)


def item_counts(items: torch.Tensor, n_items: int) -> torch.Tensor:
    """Ratings per item: int64 [n_items] from item ids int [n]."""
    return torch.bincount(items.to(torch.int64).cpu(), minlength=n_items)


def select_shard(ratings, lo: int, hi: int):
    """The ratings of items ``[lo, hi)`` with item ids made local (``item - lo``).

    ``ratings`` is a :class:`svdfill.data.dataset.Ratings`; the result keeps ``n_users`` and
    has ``n_items = hi - lo``, order preserved (so the result is deterministic). The whole
    catalogue (``lo = 0``, ``hi = n_items``) gives ``ratings`` itself, no copy: one process
    trains on its ratings as they are.
    """
    from svdfill.data.dataset import Ratings

    if lo == 0 and hi == ratings.n_items:
        return ratings
    items = ratings.items
    idx = torch.nonzero((items >= lo) & (items < hi), as_tuple=False).squeeze(1)
    return Ratings(ratings.users[idx], (items[idx] - lo).to(items.dtype), ratings.ratings[idx],
                   ratings.n_users, hi - lo)


def shard_by_rating_counts(world, train):
    """``reshard`` hook of :func:`svdfill.train.run_training`: give every rank its item
    shard, balanced by the training ratings per item (same on every rank). A one-process
    world is returned as is."""
    from svdfill.distributed.world import DistWorld

    if not isinstance(world, DistWorld):
        return world
    return world.with_shards(balanced_shards(item_counts(train.items, train.n_items),
                                             world.world_size))
