"""Exact top-k pieces shared by the fills: the tie rule, per-tile selection, shard merging
and the CSR slicing of seen sets.

The tie rule, everywhere: rows are ordered by score descending, equal scores by the lower
item id, padding (item −1, score −inf) last. ``torch.topk`` orders a tied group
arbitrarily, so the helpers here resolve ties on unique composite int64 keys
(order-preserving bits of the float32 score in the high word, the reversed column in the
low word). Used by :mod:`svdfill.kernels.fill` (the torch tiles) and by the fill's callers
(:func:`merge_topk` over item shards, :func:`csr_take` / :func:`csr_slice` of seen sets);
imports nothing else of the package.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor
CSR = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------
# ordering helpers: (score desc, item asc), -inf/-1 padding last
# ---------------------------------------------------------------------------------------

def order_by_score_then_item(scores: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by item ascending; item −1 (padding) last.

    scores float32 [R, C], items int64 [R, C] -> both [R, C] reordered.
    """
    if scores.shape[1] <= 1:
        return scores, items
    if items.numel() == 0 or int(items.max()) < 0xFFFFFFFF:
        # one sort on unique composite keys: float order high, reversed item id low
        # (padding −1 becomes 0xFFFFFFFF, i.e. the lowest low word: last among equal scores)
        low = 0xFFFFFFFF - torch.where(items < 0, 0xFFFFFFFF, items)
        _, perm = torch.sort((ordered_float_bits(scores) << 32) + low, dim=1, descending=True)
        return torch.gather(scores, 1, perm), torch.gather(items, 1, perm)
    key = torch.where(items < 0, torch.iinfo(torch.int64).max, items)
    key, perm = torch.sort(key, dim=1, stable=True)
    scores = torch.gather(scores, 1, perm)
    items = torch.gather(items, 1, perm)
    _, perm = torch.sort(scores, dim=1, descending=True, stable=True)
    return torch.gather(scores, 1, perm), torch.gather(items, 1, perm)


def ordered_float_bits(x: Tensor) -> Tensor:
    """int64 keys that sort like the float32 values ``x`` (−0.0 folded onto +0.0)."""
    bits = (x + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0: they compare equal
    # negative floats order backwards: flip their magnitude bits (no shifts: slow on CPU)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def exact_topk_cols(tile: Tensor, k: int, col_ids: Tensor | None = None) -> Tensor:
    """Positions of the k largest values per row, ties to the lower column: int64 [R, k].

    ``col_ids`` [R, n] (default: the position) are the column ids that break ties. Uses
    unique composite keys (float order in the high 32 bits, reversed column in the low 32
    bits), so ``topk`` has no choice left to make.
    """
    if col_ids is None:
        col_ids = torch.arange(tile.shape[1], device=tile.device, dtype=torch.int64)
    keys = (ordered_float_bits(tile) << 32) + (0xFFFFFFFF - col_ids)
    _, idx = torch.topk(keys, k, dim=1, sorted=False)
    return idx


def group_size(n: int, k: int) -> int:
    """Group width for the max-of-groups prefilter, or 0 when it would not pay off.

    Work ≈ n/4 (group maxima, one vectorized pass) + n/g (top-(k+1) of the maxima) +
    1.2·(k+1)·g (gather and top-k of the candidates), against n for a plain top-k."""
    best, best_cost = 0, 0.8 * n
    for g in (4, 8, 16, 32, 64, 128, 256):
        if n // g < k + 2:
            break
        cost = n / 4 + n / g + 1.2 * (k + 1) * g + n % g
        if cost < best_cost:
            best, best_cost = g, cost
    return best


def exact_rows(tile: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Ordered exact top-k of every row of ``tile`` [R, n] (k <= n) on unique keys."""
    cols = exact_topk_cols(tile, k)
    return order_by_score_then_item(torch.gather(tile, 1, cols), cols)


def tile_topk(tile: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``tile`` [R, T], ordered by (value desc, column asc):
    (values float32 [R, k'], columns int64 [R, k']) with k' = min(k, T).

    ``torch.topk`` orders a tied group arbitrarily and may cut it anywhere, so it is asked
    for k+1 sorted values: when no two neighbours among them are equal, the first k are
    the answer in the right order; rows with a tie (finite values only) are redone on
    unique (value, column) keys over the whole row (rare for real scores, common in the
    tie tests).

    Prefilter (wide rows): cut the row into G = T // g groups (group j = columns j, j+G,
    j+2G, …, so the maxima are one strided reduction) and keep the k+1 groups with the
    largest maxima; let τ be the smallest of those maxima. Every value > τ lies in a kept
    group, so the kept groups (plus the ragged tail) hold the row's top-k unless a value
    equal to τ in a dropped group could win a tie at the k-th place. That needs the k-th
    candidate to equal τ; but the k+1 kept maxima are all candidates >= τ, so then the
    (k+1)-th candidate equals τ too, and the boundary-tie check above redoes the row.
    """
    n = tile.shape[1]
    rows = tile.shape[0]
    if k >= n:
        cols = torch.arange(n, device=tile.device, dtype=torch.int64).expand(rows, n)
        return order_by_score_then_item(tile, cols)
    g = group_size(n, k) if rows else 0
    if g:
        G = n // g
        gmax = tile[:, : G * g].unflatten(1, (g, G)).amax(1)  # [R, G]
        _, gsel = torch.topk(gmax, k + 1, dim=1, sorted=False)
        offs = torch.arange(g, device=tile.device).mul_(G)
        cand_cols = (offs.view(1, g, 1) + gsel.unsqueeze(1)).flatten(1)  # [R, g·(k+1)]
        if G * g < n:
            tail = torch.arange(G * g, n, device=tile.device).expand(rows, n - G * g)
            cand_cols = torch.cat([cand_cols, tail], 1)
        vals, pos = torch.topk(torch.gather(tile, 1, cand_cols), k + 1, dim=1, sorted=True)
        cols = torch.gather(cand_cols, 1, pos)
    else:
        vals, cols = torch.topk(tile, k + 1, dim=1, sorted=True)
    # sorted by value; only equal neighbours can be out of item order or cut at the
    # boundary. -inf pairs give NaN here and are ignored: -inf entries become padding.
    redo = ((vals[:, :-1] - vals[:, 1:]) == 0).any(1).nonzero().flatten()
    vals, cols = vals[:, :k], cols[:, :k]
    if redo.numel():
        v2, c2 = exact_rows(tile.index_select(0, redo), k)
        vals = vals.index_copy(0, redo, v2)
        cols = cols.index_copy(0, redo, c2)
    return vals, cols


# ---------------------------------------------------------------------------------------
# CPU selection: a threshold from group maxima, then one sort of the few candidates
# ---------------------------------------------------------------------------------------

THRESHOLD_GROUP = 8
"""Columns per group whose maxima give the threshold of :func:`threshold_topk`."""

_U32 = np.uint64(32)


def threshold_group(n: int, k: int) -> int:
    """Group width g for :func:`threshold_topk` on rows of n columns: the largest of
    1..``THRESHOLD_GROUP`` that still leaves at least k groups (n // g >= k)."""
    return max(1, min(THRESHOLD_GROUP, n // max(k, 1)))


def threshold_topk(tile: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of a float32 [R, n] array (CPU, numpy; 1 <= k < n), ordered
    by (value desc, column asc) — :func:`tile_topk`'s result, without its per-row selects.

    (values float32 [R, k], columns int64 [R, k]); values are the array's own (−0.0 kept).

    1. Group maxima: group j holds columns j, j+G, j+2G, … (G = n // g, the ragged tail
       columns are groups of their own), so the maxima are one vectorized pass.
    2. τ = the k-th largest group maximum (``np.partition``, an AVX-512 select in numpy
       2): at least k groups have a maximum >= τ, so at least k entries are >= τ, and
       every entry of the row's top-k — *all* entries tied with its k-th value included —
       is >= τ. On Gaussian scores about 1.15·k entries pass (k = 100, n = 3,000, g = 8).
    3. The candidates (entries >= τ: they lie in the groups whose maximum is >= τ, whose
       members are gathered and compared, and in the ragged tail) get unique
       uint64 keys: row (high bits), inverted order-preserving float bits, column (low
       bits); one ``np.sort`` of all of them orders every row by the tie rule, and each
       row's first k keys are its answer. −0.0 and +0.0 share a key (they compare equal).

    Rows where τ is NaN (NaN scores) have fewer than k candidates: they go through
    :func:`tile_topk`. The row and column bits must fit 32 bits together; wider inputs are
    cut into row chunks that do.
    """
    rows, n = tile.shape
    if not 1 <= k < n:
        raise ValueError(f"threshold_topk needs 1 <= k < n, got k={k}, n={n}")
    col_bits = max(1, (n - 1).bit_length())
    chunk = 1 << max(0, 32 - col_bits)
    if rows > chunk:
        parts = [threshold_topk(tile[a : a + chunk], k) for a in range(0, rows, chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    g = threshold_group(n, k)
    G = n // g
    s0, s1 = tile.strides
    groups = np.lib.stride_tricks.as_strided(tile, (rows, g, G), (s0, G * s1, s1))  # a view
    gmain = groups.max(axis=1)  # [R, G]
    tail = n - G * g
    gmax = np.concatenate([gmain, tile[:, G * g :]], axis=1) if tail else gmain
    tau = np.partition(gmax, gmax.shape[1] - k, axis=1)[:, gmax.shape[1] - k, None]
    # candidates only from the groups whose maximum reaches τ (~1 in 3.5): gather those
    # groups' g members, keep the ones >= τ — cheaper than a compare over every entry
    gi = np.flatnonzero(gmain >= tau)
    rr = gi // G
    jj = gi - rr * G
    members = groups[rr, :, jj]  # [N, g]
    sub = np.flatnonzero(members >= tau[rr])
    q = sub // g
    r, c, v = rr[q], jj[q] + (sub - q * g) * G, members.reshape(-1)[sub]
    if tail:  # the ragged tail columns, each its own group
        tt = tile[:, G * g :]
        ft = np.flatnonzero(tt >= tau)
        rt = ft // tail
        ct = ft - rt * tail
        r = np.concatenate([r, rt])
        c = np.concatenate([c, ct + G * g])
        v = np.concatenate([v, tt[rt, ct]])
    counts = np.bincount(r, minlength=rows)
    bits = (v + np.float32(0.0)).view(np.uint32)  # -0.0 -> +0.0
    # float order as unsigned ints: negatives reversed, positives above them; inverted
    # so that an ascending sort puts the largest score first
    neg = bits >= np.uint32(0x80000000)
    inv = np.where(neg, bits, ~bits ^ np.uint32(0x80000000)).astype(np.uint64)
    keys = (r.astype(np.uint64) << np.uint64(32 + col_bits)) | (inv << np.uint64(col_bits)) | c.astype(np.uint64)
    keys.sort()
    starts = np.zeros(rows, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    ok = counts >= k
    pos = np.where(ok, starts, 0)[:, None] + np.arange(k)
    top = keys.take(np.minimum(pos, max(keys.size - 1, 0))) if keys.size else np.zeros((rows, k), np.uint64)
    cols = (top & np.uint64((1 << col_bits) - 1)).astype(np.int64)
    # the scores back from their keys (cheaper than a gather from the tile): undo the
    # inversion; a zero may have been −0.0, so zeros are read from the tile
    inv = (top >> np.uint64(col_bits)).astype(np.uint32)
    vals = np.where(inv >= np.uint32(0x80000000), inv, ~(inv ^ np.uint32(0x80000000))).view(np.float32)
    if not ok.all():  # NaN scores: the exact torch path for those rows
        bad = np.flatnonzero(~ok)
        v2, c2 = tile_topk(torch.from_numpy(tile[bad]), k)
        cols[bad], vals[bad] = c2.numpy(), v2.numpy()
    zero = np.flatnonzero(vals == 0)
    if zero.size:
        vals.reshape(-1)[zero] = np.take_along_axis(tile, cols, axis=1).reshape(-1)[zero]
    return vals, cols


# ---------------------------------------------------------------------------------------
# CSR helpers
# ---------------------------------------------------------------------------------------

def csr_take(indptr: Tensor, indices: Tensor, rows: Tensor) -> CSR:
    """The CSR of the given rows, in the given order: (indptr int64 [len(rows)+1], indices)."""
    rows = rows.to(torch.int64)
    starts = indptr[rows].to(torch.int64)
    counts = indptr[rows + 1].to(torch.int64) - starts
    new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=new_ptr[1:])
    nnz = int(new_ptr[-1])
    # position of each output entry in the old indices: start of its row + offset within it
    row_of = torch.repeat_interleave(torch.arange(rows.numel()), counts)
    offs = torch.arange(nnz, dtype=torch.int64) - new_ptr[:-1][row_of]
    return new_ptr, indices[starts[row_of] + offs]


def csr_slice(indptr: Tensor, indices: Tensor, lo: int, hi: int) -> CSR:
    """The CSR of rows ``lo..hi-1`` (a contiguous block of users): indptr rebased to 0,
    indices a view; on the inputs' device."""
    a, b = int(indptr[lo]), int(indptr[hi])
    return indptr[lo : hi + 1] - a, indices[a:b]


def seen_by_tile(rows: Tensor, cols: Tensor, tile: int, n_tiles: int):
    """Group a block's seen entries by item tile: (rows, cols, bounds) sorted by tile."""
    if n_tiles == 1:
        return rows, cols, [0, rows.numel()]
    t = cols // tile
    order = torch.argsort(t, stable=True)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(t, minlength=n_tiles)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    return rows, cols, bounds


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], k: int | None = None) -> tuple[Tensor, Tensor]:
    """Merge per-shard top-k lists of the same users into one: (scores [U, k], items [U, k]).

    Each part is ``(scores float32 [U, k_p], items int64 [U, k_p])`` (e.g. ``fill_topk`` on
    one item shard with its ``item_offset``); k defaults to the largest k_p. Order: score
    descending, ties by lower item id, padding (item −1, −inf) last — the rule of
    :func:`svdfill.kernels.fill.fill_topk`, so merging shards equals filling the whole catalogue.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one (scores, items) pair")
    k = max(p[0].shape[1] for p in parts) if k is None else k
    scores = torch.cat([p[0].to(torch.float32) for p in parts], 1)
    items = torch.cat([p[1].to(torch.int64) for p in parts], 1)
    items = torch.where(torch.isneginf(scores), -1, items)
    scores, items = order_by_score_then_item(scores, items)
    n = scores.shape[1]
    if n >= k:
        return scores[:, :k].contiguous(), items[:, :k].contiguous()
    pad = k - n
    return (torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1),
            torch.cat([items, items.new_full((items.shape[0], pad), -1)], 1))
