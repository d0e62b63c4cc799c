"""Reading a ratings dataset across a world: each rank reads a share, ratings travel to the
rank that trains their item.

One process reads everything (``data.dataset.load_dataset``). In a world of W ranks that
would make every rank read, parse and hold the whole dataset; here instead:

1. every rank resolves the same sorted parts and reads only its share of them
   (:func:`svdfill.data.sources.share`: contiguous Parquet row groups and text files,
   balanced by bytes), so rank r's rows precede rank r+1's in the dataset's order;
2. the id map is built once for the world: each rank's distinct raw ids are all-gathered
   and merged, so every rank holds the map one process would build from the whole file;
3. the hold-out split is a function of a rating's position in the dataset
   (:func:`svdfill.data.split.random_val_mask`), so each rank splits its rows exactly as
   one process splits the whole, drawing only its own range (above 2^24 ratings; memory of
   its rows, not of the dataset);
4. items are cut into the trainer's shards from the all-reduced per-item training counts
   (the same cut as before), and one all-to-all sends every rating to the rank that owns
   its item. Received in rank order, a rank's ratings keep the dataset's order: the trainer
   sees the very tensors it saw when every rank read everything.

Duplicate pairs are checked where they meet: all ratings of an item end on one rank. A bad
rating, a malformed line or a duplicate raises the same error on every rank (the one that
one process would raise first), so no rank waits forever on a collective.

``data.split = "per_user"`` or ``"time"`` and ``data.dedupe = "last" | "mean"`` need a user's
(or a pair's) ratings in one place before the split: then a first all-to-all sends every
rating, with its position and time, to the rank of its user (:func:`_user_pass`), which
resolves duplicates as one process does (:func:`svdfill.data.readers.resolve_duplicates`;
the dropped rows' positions, few, are all-gathered so every survivor learns its position in
the deduplicated dataset) and draws the split at those positions
(:func:`svdfill.data.split.user_split_mask`: the one-process masks, O(local) memory); the
second all-to-all then goes to the item shards as above, each rank's ratings put back in
dataset order. Only the synthetic preset (generated, not read) is left to the old path
(every rank generates everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from svdfill.data.dataset import Ratings
from svdfill.data.errors import DataError
from svdfill.data.idmap import IdMap


@dataclass
class ShardedData:
    """What one rank trains on after :func:`read_sharded`.

    train, val: this rank's item shard's ratings, global ids, in dataset order (full id-space
    sizes). idmap: the world's id map (the same on every rank). shards: every rank's item
    range. n_ratings: ratings in the whole dataset. parts: what this rank read (display
    names, with ``[row groups lo:hi]`` for a share of a Parquet file). bytes_read: their
    bytes on storage.
    """

    train: Ratings
    val: Ratings
    idmap: IdMap
    shards: list[tuple[int, int]]
    n_ratings: int
    parts: list[str]
    bytes_read: int


def supported(data_cfg: Any) -> str | None:
    """None when :func:`read_sharded` can read ``data_cfg``; else why the old path runs."""
    if not data_cfg.path:
        return "synthetic data is generated, not read"
    return None


def needs_user_pass(data_cfg: Any) -> bool:
    """The split or the duplicate policy needs all of a user's ratings in one place."""
    return data_cfg.split != "random" or data_cfg.dedupe != "error"


# -- collectives ------------------------------------------------------------------------------

def _all_gather(world, obj) -> list:
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def _agreed(world, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raised a DataError on any rank, raise the lowest
    rank's on all of them (its rows come first in the dataset, so it is the error one
    process would have raised)."""
    try:
        out, err = fn(), None
    except DataError as e:
        out, err = None, str(e)
    errors = _all_gather(world, err)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise DataError(first)
    return out


def _exchange(world, columns: list[torch.Tensor], dest: torch.Tensor) -> list[torch.Tensor]:
    """Send row j of every column to rank ``dest[j]``; returns the rows received, from
    rank 0's first, each sender's in their order. columns: CPU tensors [n] (or [n, c]);
    dest: int64 [n]."""
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world.world_size)
    recv_counts = torch.empty_like(send_counts)
    comm = getattr(world, "comm_device", torch.device("cpu"))
    sc, rc = send_counts.to(comm), recv_counts.to(comm)
    dist.all_to_all_single(rc, sc)
    send, recv = sc.cpu().tolist(), rc.cpu().tolist()
    out = []
    for col in columns:
        src = col[order].to(comm)
        got = torch.empty((sum(recv),) + tuple(col.shape[1:]), dtype=col.dtype, device=comm)
        dist.all_to_all_single(got, src, output_split_sizes=recv, input_split_sizes=send)
        out.append(got.cpu())
    return out


# -- the steps ---------------------------------------------------------------------------------

def _merged_ids(world, local: np.ndarray) -> np.ndarray:
    """The sorted distinct raw ids of the whole world from each rank's ``local`` ones: int64,
    or ``str`` everywhere when any rank has text ids (as one process joining the parts)."""
    from svdfill.data.idmap import factorize

    uniq, _ = factorize(local) if local.size else (local, None)
    parts = _all_gather(world, uniq)
    if all(p.dtype == np.int64 for p in parts):
        return np.unique(np.concatenate(parts)).astype(np.int64)
    text = np.unique(np.concatenate([p.astype(str) for p in parts]))
    return text.astype(object)


def _as_kind(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    return ids.astype(str).astype(object) if table.dtype == object and ids.dtype != object else ids


def read_sharded(data_cfg: Any, world, *, log: Callable[[str], None] | None = None) -> ShardedData:
    """This rank's share of ``data_cfg``'s dataset, split and routed to its item shard (see
    the module docstring). Every rank of ``world`` (a ``DistWorld``) must call it."""
    from svdfill.config import resolve_data_path
    from svdfill.data.readers import read_parts
    from svdfill.data.sources import is_uri, resolve, share
    from svdfill.data.split import random_val_mask
    from svdfill.distributed.sharding import balanced_shards

    path = data_cfg.path if is_uri(data_cfg.path) else str(resolve_data_path(data_cfg.path))
    lo, hi = float(data_cfg.scale_min), float(data_cfg.scale_max)
    scale: Any = "auto" if math.isnan(lo) and math.isnan(hi) else (lo, hi)
    W, rank = world.world_size, world.rank

    def read():
        parts = resolve(path)
        mine = share(parts, rank, W)
        source = parts[0].display if len(parts) == 1 else path.split("?", 1)[0]
        raw, locate = read_parts(mine, source=source, format=data_cfg.format, sep=data_cfg.sep,
                                 user_col=data_cfg.user_col, item_col=data_cfg.item_col,
                                 rating_col=data_cfg.rating_col, scale=scale,
                                 timestamps=data_cfg.split == "time", time_col=data_cfg.time_col)
        return parts, mine, source, raw, locate

    parts, mine, source, raw, locate = _agreed(world, read)
    counts = _all_gather(world, len(raw))
    n, offset = sum(counts), sum(counts[:rank])
    if n == 0:
        raise DataError(f"{source}: no ratings (the file holds no data rows)")

    users = _merged_ids(world, raw.users)
    items = _merged_ids(world, raw.items)
    idmap = IdMap(users, items)
    uc = idmap.encode_users(_as_kind(raw.users, users))
    ic = idmap.encode_items(_as_kind(raw.items, items))
    ratings = torch.from_numpy(np.ascontiguousarray(raw.ratings, dtype=np.float32))
    ts = None if raw.timestamps is None else torch.from_numpy(np.asarray(raw.timestamps, dtype=np.int64))
    del raw
    u32 = torch.from_numpy(uc.astype(np.int32))
    i32 = torch.from_numpy(ic.astype(np.int32))
    del uc, ic
    rows = torch.arange(offset, offset + len(ratings), dtype=torch.int64)
    order = None
    if needs_user_pass(data_cfg):
        # every rating to its user's rank: duplicates resolved and the split drawn there
        u32, i32, ratings, rows, order, is_val, n = _user_pass(world, data_cfg, idmap, u32, i32,
                                                               ratings, rows, ts, n)
    else:
        # the split is a function of n and the seed: each rank draws its own rows' part
        is_val = torch.from_numpy(random_val_mask(n, data_cfg.val_fraction, data_cfg.split_seed,
                                                  offset, offset + len(ratings)))
    del ts

    # the trainer's cut: balanced by the training ratings per item, as before
    train_counts = torch.bincount(i32[~is_val].long(), minlength=idmap.n_items).to(torch.float64)
    world.all_reduce_sum(train_counts)
    shards = balanced_shards(train_counts.long(), W)
    bounds = torch.tensor([b for _, b in shards[:-1]], dtype=torch.int32)
    dest = torch.bucketize(i32, bounds, right=True).long()
    # positions travel along (8 bytes a rating) so a duplicate can be named by file and line
    # (after a user pass: the position in the deduplicated dataset, to restore its order)
    cols = [u32, i32, ratings, is_val.to(torch.uint8), rows] + ([order] if order is not None else [])
    got = _exchange(world, cols, dest)
    del u32, i32, ratings, is_val, dest, rows, cols, order
    got_u, got_i, got_r, got_v, got_rows = got[:5]
    got_v = got_v.bool()
    if len(got) == 6:  # back in dataset order: the tensors one process would shard
        back = torch.argsort(got[5])
        got_u, got_i, got_r, got_v, got_rows = (t[back] for t in (got_u, got_i, got_r, got_v, got_rows))
    del got

    if data_cfg.dedupe == "error":
        _check_duplicates(world, got_u, got_i, got_rows, idmap, locate, source, (offset, counts[rank]))
    del got_rows
    train = Ratings(got_u[~got_v], got_i[~got_v], got_r[~got_v], idmap.n_users, idmap.n_items)
    val = Ratings(got_u[got_v], got_i[got_v], got_r[got_v], idmap.n_users, idmap.n_items)
    names = [p.display + (f" [row groups {p.row_groups[0]}:{p.row_groups[1]}]"
                          if p.row_groups is not None else "") for p in mine]
    if log is not None:
        log(f"rank {rank}: read {len(names)} of {len(parts)} parts ({counts[rank]:,} of "
            f"{n:,} ratings), trains {len(train) + len(val):,} of items {shards[rank]}")
    return ShardedData(train, val, idmap, shards, n, names, sum(p.bytes_to_read for p in mine))


def _user_pass(world, data_cfg: Any, idmap: IdMap, users: torch.Tensor, items: torch.Tensor,
               ratings: torch.Tensor, rows: torch.Tensor, ts: torch.Tensor | None, n: int):
    """Route every rating to rank ``user % W``, resolve duplicates there (``data.dedupe``
    last/mean) and draw the hold-out (:func:`svdfill.data.split.user_split_mask`).

    In: this rank's read rows (users/items int32 [m], ratings float32 [m], rows int64 [m] =
    dataset positions, ts int64 [m] or None). Out: the rows now held (users, items, ratings,
    ``rows`` = original positions (for error messages), ``order`` = positions in the
    deduplicated dataset, ``is_val`` bool), and that dataset's size."""
    from svdfill.config import parse_split_time
    from svdfill.data.readers import resolve_duplicates
    from svdfill.data.split import user_split_mask

    W = world.world_size
    cols = [users, items, ratings, rows] + ([ts] if ts is not None else [])
    got = _exchange(world, cols, users.long() % W)
    users, items, ratings, rows = got[:4]
    ts = got[4] if ts is not None else None
    del got, cols
    if data_cfg.dedupe != "error":
        # rows arrive in dataset order (senders in rank order, each in its order): the same
        # rows one process keeps, and the dropped ones' positions shift the survivors'
        key = users.long().numpy() * max(idmap.n_items, 1) + items.long().numpy()
        keep, r, t = resolve_duplicates(key, ratings.numpy(), None if ts is None else ts.numpy(),
                                        data_cfg.dedupe)
        dropped = np.setdiff1d(rows.numpy(), rows.numpy()[keep], assume_unique=True)
        keep_t = torch.from_numpy(keep)
        users, items, rows = users[keep_t], items[keep_t], rows[keep_t]
        ratings = torch.from_numpy(np.ascontiguousarray(r))
        ts = None if t is None else torch.from_numpy(np.ascontiguousarray(t))
        all_dropped = np.sort(np.concatenate(_all_gather(world, dropped)))
        order = rows - torch.from_numpy(np.searchsorted(all_dropped, rows.numpy()).astype(np.int64))
        n -= int(all_dropped.size)
    else:
        order = rows
    cutoff = (parse_split_time(data_cfg.split_time)
              if data_cfg.split == "time" and data_cfg.split_time != "" else None)
    is_val = user_split_mask(data_cfg.split, users.long().numpy(), order.numpy(), n, idmap.n_users,
                             fraction=data_cfg.val_fraction, seed=data_cfg.split_seed,
                             timestamps=None if ts is None else ts.numpy(), cutoff=cutoff)
    return users, items, ratings, rows, order, torch.from_numpy(is_val), n


def _check_duplicates(world, users: torch.Tensor, items: torch.Tensor, rows: torch.Tensor,
                      idmap: IdMap, locate, source: str, mine: tuple[int, int]) -> None:
    """Raise, on every rank, the error one process raises for the dataset's first repeated
    (user, item) pair. All ratings of an item sit on its owning rank, so each rank finds its
    own repeats; the earliest over the world is named by the ranks that read its rows.

    users, items: int32 [m] this rank's ratings after the exchange; rows: int64 [m] their
    positions in the dataset; mine: (first position, count) of the rows this rank read,
    which ``locate`` names."""
    from svdfill.data.readers import _plain, count_distinct_pairs

    u = users.numpy().astype(np.int64)
    i = items.numpy().astype(np.int64)
    local = len(u) - count_distinct_pairs(u, i, idmap.n_users, idmap.n_items)
    total = torch.tensor([float(local)], dtype=torch.float64)
    world.all_reduce_sum(total)
    n_dup = int(total.item())
    if n_dup == 0:
        return
    found = None
    if local:
        # the first later occurrence in dataset order, and the first occurrence it repeats
        key = u * max(idmap.n_items, 1) + i
        r = rows.numpy()
        order = np.lexsort((r, key))
        skey, srow = key[order], r[order]
        dup = np.flatnonzero(skey[1:] == skey[:-1]) + 1
        j = int(dup[np.argmin(srow[dup])])
        first = int(srow[np.searchsorted(skey, skey[j])])
        found = (int(srow[j]), first, int(u[order[j]]), int(i[order[j]]))
    later, first, uc, ic = min(f for f in _all_gather(world, found) if f is not None)
    lo, count = mine
    named = {p: locate([p - lo])[0] for p in (later, first) if lo <= p < lo + count}
    where_is = {}
    for d in _all_gather(world, named):
        where_is.update(d)
    (loc_j, _, text_j), (_, label_i, text_i) = where_is[later], where_is[first]
    raise DataError(
        f"{loc_j}: duplicate (user, item) pair ({_plain(idmap.user_ids[uc])}, "
        f"{_plain(idmap.item_ids[ic])}): {text_j} repeats {label_i} {text_i} ({n_dup} duplicate "
        f"row{'s' if n_dup > 1 else ''} in all); set data.dedupe (--dedupe) to 'last' or "
        "'mean' to accept them")


def gather_seen(world, train: Ratings, val: Ratings):
    """The run's two seen sets, ``(train CSR, train ∪ val CSR)`` as
    :func:`svdfill.data.csr.build_csr_pair` gives them for the whole dataset, on the main
    rank (None elsewhere), from every rank's item-shard ratings. A user's row is the ranks'
    rows joined in rank order: shards are ascending item ranges, so it stays sorted.
    Every rank must call it."""
    from svdfill.data.csr import build_csr_pair

    n_users = train.n_users
    local = build_csr_pair(train.users, train.items, val.users, val.items, n_users)
    local = [(p.numpy(), i.numpy()) for p, i in local]
    out = [None] * world.world_size if world.is_main else None
    dist.gather_object(local, out, dst=0)
    if not world.is_main:
        return None
    return tuple(_join_rows([o[k] for o in out]) for k in range(2))


def _join_rows(csrs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One CSR whose row u is row u of each of ``csrs`` in turn (int64 indptr, the
    indices' dtype kept)."""
    counts = [np.diff(p) for p, _ in csrs]
    total = np.sum(counts, axis=0)
    indptr = np.zeros(total.size + 1, dtype=np.int64)
    np.cumsum(total, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=csrs[0][1].dtype)
    before = indptr[:-1].copy()  # where the next rank's part of each row starts
    for (p, idx), c in zip(csrs, counts):
        pos = np.repeat(before - p[:-1], c) + np.arange(idx.size, dtype=np.int64)
        indices[pos] = idx
        before += c
    return torch.from_numpy(indptr), torch.from_numpy(indices)
