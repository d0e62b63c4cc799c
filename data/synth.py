"""Planted low-rank ratings: a known model plus Gaussian noise, so a trainer can be checked
against the truth (its validation RMSE should approach the noise σ).

The planted model (raw user id ``u`` and item id ``i`` index the truth arrays directly)::

    r(u, i) = μ + b_u + b_i + p_u·q_i + ε,    ε ~ N(0, σ²)
    b_u ~ N(0, 0.35²),  b_i ~ N(0, 0.45²),  p_u, q_i ~ N(0, s² I_r),  s² = sqrt(0.4 / r)

so ``var(p_u·q_i) = r·s⁴ = 0.4`` for every rank and the noise-free signal has standard
deviation ≈ 0.85 around μ (MovieLens ratings have ≈ 1.1 in all): with μ = 3.5, σ = 0.5 the
ratings fall mostly in 1.5–5.5. They are **not** clipped or rounded (clipping would make
the RMSE floor lower than σ and the noise non-Gaussian); a perfect model scores RMSE σ.

Who rates what: user activity follows a power law (``user_skew``: expected count of the
k-th most active user ∝ k^-user_skew), item popularity a Zipf law (``zipf``), both over a
random permutation of ids. Each user's items are drawn by popularity *without*
replacement (successive sampling: draws repeating an item the user already has are
dropped and redrawn, and very active users use the equivalent exponential-keys top-k),
so no (user, item) pair repeats and the total is exactly ``n_ratings`` (each user's count is
capped at ``n_items``; the excess goes to the others).

How close to σ a trained model can get depends on the ratings per user: even a model that
knew every item exactly scores ≈ σ·sqrt(1 + (r+1)/n_u) for a user with n_u training
ratings (:func:`oracle_rmse` computes it for a split). E.g. 20k users × 2k items × 2M
ratings at rank 16 (90 train ratings per user) floors at ≈ 1.10σ; 5k users at the same
size at ≈ 1.02σ.

Everything is vectorized and produced in chunks of whole users (so the no-repeat rule
holds across chunks), each chunk from its own seeded stream: the data depend only on the
config (and this module's chunk constants), not on the number of threads, and :func:`write_parquet` holds a few chunks in memory
at a time (600k users × 3k items × 100M ratings writes in bounded memory). Chunks run on
:data:`THREADS` worker threads (numpy releases the GIL in its heavy kernels). Repeats are
dropped with a reused bool user×item table per chunk when the matrix is at least
:data:`DENSE_MIN_DENSITY` full, else by sorting; ratings come from one block GEMM per chunk
when it is at least :data:`GEMM_MIN_DENSITY` full, else from per-rating dot products.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from svdfill.data.errors import DataError
from svdfill.data.readers import RawRatings

THREADS = 0
"""Worker threads for chunk generation; 0 = one per CPU core."""
CHUNK = 1 << 20
"""Target ratings per generated chunk (and per Parquet row group)."""
USER_BIAS_STD = 0.35
ITEM_BIAS_STD = 0.45
INTERACTION_VAR = 0.4
_HEAVY_FRACTION = 1 / 8  # users rating more than this share of all items use Gumbel-top-k


@dataclass
class PlantedTruth:
    """The model that generated the ratings. Rows are indexed by raw id.

    user_factors float32 [U, r], item_factors float32 [I, r], user_bias float32 [U],
    item_bias float32 [I], global_mean μ, noise σ.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float
    noise: float

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Noise-free ratings (float64 [n]) of raw (user, item) ids."""
        u = np.asarray(users, dtype=np.int64)
        i = np.asarray(items, dtype=np.int64)
        dot = np.einsum("nr,nr->n", self.user_factors[u].astype(np.float64),
                        self.item_factors[i].astype(np.float64))
        return self.global_mean + self.user_bias[u].astype(np.float64) + self.item_bias[i] + dot


def _check(cfg: Any) -> None:
    if cfg.n_users < 1 or cfg.n_items < 1 or cfg.n_ratings < 1 or cfg.rank < 1:
        raise DataError("data.synthetic: n_users, n_items, n_ratings and rank must be ≥ 1")
    if cfg.noise < 0 or cfg.zipf < 0 or cfg.user_skew < 0:
        raise DataError("data.synthetic: noise, zipf and user_skew must be ≥ 0")
    if cfg.n_ratings > cfg.n_users * cfg.n_items:
        raise DataError(f"data.synthetic: n_ratings = {cfg.n_ratings:,} exceeds n_users × n_items = "
                        f"{cfg.n_users * cfg.n_items:,} distinct pairs")


def _rng(cfg: Any, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(cfg.seed) & 0xFFFFFFFF, *stream]))


def planted(cfg: Any) -> PlantedTruth:
    """The planted model of ``cfg`` (a :class:`~svdfill.config.SynthConfig`)."""
    _check(cfg)
    rng = _rng(cfg, 1)
    s = (INTERACTION_VAR / cfg.rank) ** 0.25
    P = (rng.standard_normal((cfg.n_users, cfg.rank), dtype=np.float32) * s)
    Q = (rng.standard_normal((cfg.n_items, cfg.rank), dtype=np.float32) * s)
    bu = rng.standard_normal(cfg.n_users, dtype=np.float32) * USER_BIAS_STD
    bi = rng.standard_normal(cfg.n_items, dtype=np.float32) * ITEM_BIAS_STD
    return PlantedTruth(P, Q, bu, bi, float(cfg.mean), float(cfg.noise))


def _power_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ∝ rank^-exponent over a random permutation of ``n`` ids (float64, sum 1)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(exponent)
    w = w[rng.permutation(n)]
    return w / w.sum()


def item_weights(cfg: Any) -> np.ndarray:
    """Item popularity (float64 [I], sum 1)."""
    return _power_weights(cfg.n_items, cfg.zipf, _rng(cfg, 2))


def user_counts(cfg: Any) -> np.ndarray:
    """Ratings per user (int64 [U]), summing to ``n_ratings``, each at most ``n_items``."""
    _check(cfg)
    rng = _rng(cfg, 3)
    w = _power_weights(cfg.n_users, cfg.user_skew, rng)
    cap = float(cfg.n_items)
    e = w * cfg.n_ratings
    capped = np.zeros(cfg.n_users, dtype=bool)
    for _ in range(100):  # water-filling: cap the heaviest users, spread their excess
        over = e > cap
        if not over.any():
            break
        excess = float((e[over] - cap).sum())
        e[over] = cap
        capped |= over
        free = ~capped
        e[free] += excess * w[free] / w[free].sum()
    # systematic rounding: each count is floor or ceil of its expectation, total exact
    c = np.floor(np.cumsum(e) + rng.random())
    counts = np.diff(np.concatenate([[0.0], c])).astype(np.int64)
    counts = np.minimum(counts, cfg.n_items)
    short = cfg.n_ratings - int(counts.sum())
    if short > 0:  # float rounding at the very end: give the remainder to users with room
        room = np.flatnonzero(counts < cfg.n_items)
        add = np.minimum(cfg.n_items - counts[room], short)
        add = np.minimum(add, np.maximum(short - np.concatenate([[0], np.cumsum(add)[:-1]]), 0))
        counts[room] += add
    return counts


TABLE_MAX = 1 << 23
"""Dense mode: at most this many (user, item) cells per chunk (a bool table + a score block)."""
DENSE_MIN_DENSITY = 1 / 256
"""Below this fill ratio of the user×item matrix, chunks dedupe by sorting instead."""
GEMM_MIN_DENSITY = 1 / 16
"""From this fill ratio up, a chunk's ratings come from one user-block × items GEMM;
below, from a per-rating gather and dot product."""


def _chunks(cfg: Any, counts: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous user ranges [lo, hi): dense mode takes a fixed number of users per chunk
    (so the chunk's user×item table has ≤ TABLE_MAX cells), sparse mode about CHUNK ratings."""
    if _dense(cfg):
        rows = max(1, TABLE_MAX // cfg.n_items)
        bounds = np.unique(np.concatenate([np.arange(0, cfg.n_users, rows), [cfg.n_users]]))
    else:
        ends = np.cumsum(counts)
        cuts = np.searchsorted(ends, np.arange(CHUNK, int(ends[-1]), CHUNK), side="left") + 1
        bounds = np.unique(np.concatenate([[0], cuts, [len(counts)]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _dense(cfg: Any) -> bool:
    return cfg.n_ratings >= DENSE_MIN_DENSITY * cfg.n_users * cfg.n_items


class _ItemSampler:
    """Popularity-weighted item draws with replacement: inverse CDF through a guide table
    (O(1) expected per draw, no binary search)."""

    def __init__(self, weights: np.ndarray):
        self.n = weights.size
        cdf = np.cumsum(weights)
        self.cdf = cdf / cdf[-1]
        self.k = 4 * self.n
        self.guide = np.searchsorted(self.cdf, np.arange(self.k) / self.k, side="right").astype(np.int64)

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(m)
        j = self.guide[(u * self.k).astype(np.int64)]
        np.minimum(j, self.n - 1, out=j)
        todo = np.flatnonzero(self.cdf[j] <= u)
        while todo.size:  # a few steps past the guide entry; the set shrinks fast
            j[todo] += 1
            np.minimum(j, self.n - 1, out=j)
            keep = (self.cdf[j[todo]] <= u[todo]) & (j[todo] < self.n - 1)
            todo = todo[keep]
        return j


def _gumbel_rows(counts: np.ndarray, weights: np.ndarray, rng: np.random.Generator):
    """For each row, ``counts[k]`` distinct items by Gumbel-top-k (weighted sampling without
    replacement, the same law as drawing until that many distinct): yields (row offset
    array, items array) blocks."""
    n_items = weights.size
    inv_w = (1.0 / weights).astype(np.float32)
    rows = max(1, (1 << 22) // n_items)
    for a in range(0, counts.size, rows):
        cc = counts[a:a + rows]
        # E/w with E ~ Exp(1): the c smallest are a weighted sample without replacement
        # (Efraimidis–Spirakis; equivalent to Gumbel-top-k on log w). Keys are continuous,
        # so "≤ the c-th smallest" selects exactly c items (float32 ties: ~never).
        keys = rng.standard_exponential((cc.size, n_items), dtype=np.float32)
        keys *= inv_w
        thr = np.sort(keys, axis=1)[np.arange(cc.size), cc - 1]
        r, items = np.nonzero(keys <= thr[:, None])
        yield r + a, items.astype(np.int64)


def _heavy_mask(cfg: Any, c: np.ndarray) -> np.ndarray:
    return c > max(_HEAVY_FRACTION * cfg.n_items, 8)


def _row_counts(table: np.ndarray) -> np.ndarray:
    """Set cells per row of a bool table [R, W] (W a multiple of 8): each byte is 0 or 1,
    so the popcount of a row's uint64 words is its number of set cells."""
    words = table.view(np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy ≥ 2.0
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    return ((words * np.uint64(0x0101010101010101)) >> np.uint64(56)).sum(axis=1).astype(np.int64)


class _Workspace(threading.local):
    """Per-thread buffers reused across chunks: fresh 10-30 MB arrays per chunk would cost
    page faults on every first touch."""

    def __init__(self) -> None:
        self.table = np.zeros(0, dtype=bool)
        self.block = np.zeros(0, dtype=np.float32)

    def get_table(self, rows: int, width: int) -> np.ndarray:
        """An all-False bool table [rows, width] (callers clear what they set)."""
        if self.table.size < rows * width:
            self.table = np.zeros(rows * width, dtype=bool)
        return self.table[: rows * width].reshape(rows, width)

    def get_block(self, rows: int, cols: int) -> np.ndarray:
        if self.block.size < rows * cols:
            self.block = np.empty(rows * cols, dtype=np.float32)
        return self.block[: rows * cols].reshape(rows, cols)


_WS = _Workspace()


def _pairs_dense(cfg: Any, c: np.ndarray, sampler: _ItemSampler, weights: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64, items int64) of the chunk's distinct pairs, sorted by (row, item);
    ``row`` is the user's offset in the chunk, ``c`` the wanted count per row."""
    n_items = cfg.n_items
    width = -(-n_items // 8) * 8  # padded so a row is whole uint64 words
    table = _WS.get_table(c.size, width)
    flat = table.reshape(-1)
    heavy = _heavy_mask(cfg, c)
    light = np.flatnonzero(~heavy & (c > 0))
    pend_rows, pend_n = light, c[light]
    while pend_rows.size:
        # draw exactly the deficit: the kept set is then the first c distinct of an i.i.d.
        # popularity stream, never more
        du = np.repeat(pend_rows * width, pend_n)
        du += sampler.draw(du.size, rng)
        flat[du] = True
        if pend_rows.size * 4 > c.size:
            got = _row_counts(table)[pend_rows]
        else:
            got = _row_counts(table[pend_rows])
        want = c[pend_rows]
        short = got < want
        pend_n = (want - got)[short].astype(np.int64)
        pend_rows = pend_rows[short]
    hrows = np.flatnonzero(heavy)
    if hrows.size:
        for r, items in _gumbel_rows(c[hrows], weights, rng):
            flat[hrows[r] * width + items] = True
    cells = np.flatnonzero(flat)
    flat[cells] = False  # leave the reused table clean
    rows = cells // width
    return rows, cells - rows * width


def _pairs_sparse(cfg: Any, c: np.ndarray, sampler: _ItemSampler, weights: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`_pairs_dense` for a matrix too sparse for a table: dedupe by sort."""
    n_items = cfg.n_items
    heavy = _heavy_mask(cfg, c)
    light = np.flatnonzero(~heavy & (c > 0))
    have = np.zeros(0, dtype=np.int64)  # sorted distinct cells so far
    pend_rows, pend_n = light, c[light]
    while pend_rows.size:
        du = np.repeat(pend_rows, pend_n)
        du *= n_items
        du += sampler.draw(du.size, rng)
        new = np.sort(du)
        fresh = np.ones(new.size, dtype=bool)
        fresh[1:] = new[1:] != new[:-1]
        if have.size:
            pos = np.minimum(np.searchsorted(have, new), have.size - 1)
            fresh &= have[pos] != new
        new = new[fresh]
        # two sorted runs: the stable sort (timsort) merges them in linear time
        have = np.sort(np.concatenate([have, new]), kind="stable")
        got = np.bincount(new // n_items, minlength=c.size)[pend_rows]
        short = got < pend_n
        pend_n = (pend_n - got)[short]
        pend_rows = pend_rows[short]
    parts = [have]
    hrows = np.flatnonzero(heavy)
    if hrows.size:
        for r, items in _gumbel_rows(c[hrows], weights, rng):
            parts.append(hrows[r] * n_items + items)
    cells = np.sort(np.concatenate(parts), kind="stable") if len(parts) > 1 else have
    rows = cells // n_items
    return rows, cells - rows * n_items


def _augmented(truth: PlantedTruth) -> tuple[np.ndarray, np.ndarray]:
    """[p_u, b_u, 1] and [q_i, 1, b_i + μ] (float32): one dot product gives the whole
    noise-free rating μ + b_u + b_i + p_u·q_i."""
    U, I = truth.user_bias.size, truth.item_bias.size
    pa = np.concatenate([truth.user_factors, truth.user_bias[:, None], np.ones((U, 1), np.float32)], 1)
    qa = np.concatenate([truth.item_factors, np.ones((I, 1), np.float32),
                         (truth.item_bias + np.float32(truth.global_mean))[:, None]], 1)
    return np.ascontiguousarray(pa, dtype=np.float32), np.ascontiguousarray(qa, dtype=np.float32)


def _chunk(cfg: Any, truth: PlantedTruth, aug: tuple[np.ndarray, np.ndarray], counts: np.ndarray,
           sampler: _ItemSampler, weights: np.ndarray, k: int, lo: int, hi: int):
    rng = _rng(cfg, 4, k)
    c = counts[lo:hi]
    dense = _dense(cfg)
    rows, items = (_pairs_dense if dense else _pairs_sparse)(cfg, c, sampler, weights, rng)
    users = rows + lo
    P, Q = aug
    if cfg.n_ratings >= GEMM_MIN_DENSITY * cfg.n_users * cfg.n_items:
        # one small GEMM beats gathering r-vectors per rating at this density
        block = np.matmul(P[lo:hi], Q.T, out=_WS.get_block(hi - lo, cfg.n_items))
        r = block.reshape(-1).take(rows * cfg.n_items + items)
    else:  # np.take + einsum: far faster than fancy indexing of rows
        r = np.einsum("nr,nr->n", np.take(P, users, axis=0), np.take(Q, items, axis=0))
    if truth.noise > 0:
        noise = rng.standard_normal(users.size, dtype=np.float32)
        noise *= np.float32(truth.noise)
        r += noise
    return users, items, r.astype(np.float32, copy=False)


def iter_chunks(cfg: Any, truth: PlantedTruth | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (users int64 [m], items int64 [m], ratings float32 [m]) chunk by chunk, whole
    users per chunk, users ascending."""
    truth = truth if truth is not None else planted(cfg)
    counts = user_counts(cfg)
    weights = item_weights(cfg)
    sampler = _ItemSampler(weights)
    aug = _augmented(truth)
    chunks = _chunks(cfg, counts)

    def work(k: int):
        lo, hi = chunks[k]
        return _chunk(cfg, truth, aug, counts, sampler, weights, k, lo, hi)

    # chunks are independent (own seeded stream), so threads change speed, not data; numpy
    # releases the GIL in sorts, takes, GEMM and random draws. At most threads + 1 in flight.
    n_threads = max(1, min(THREADS or (os.cpu_count() or 1), len(chunks)))
    if n_threads == 1:
        for k in range(len(chunks)):
            yield work(k)
        return
    with ThreadPoolExecutor(n_threads, thread_name_prefix="svdfill-synth") as pool:
        pending: deque = deque()
        for k in range(len(chunks)):
            pending.append(pool.submit(work, k))
            if len(pending) > n_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def generate(cfg: Any) -> RawRatings:
    """All ratings of ``cfg`` in memory, with the planted model in ``.truth``
    (a :class:`PlantedTruth`). Raw ids are ``0..n_users-1`` / ``0..n_items-1`` (int64)."""
    truth = planted(cfg)
    n = int(cfg.n_ratings)
    users = np.empty(n, dtype=np.int64)
    items = np.empty(n, dtype=np.int64)
    ratings = np.empty(n, dtype=np.float32)
    at = 0
    for u, i, r in iter_chunks(cfg, truth):
        users[at:at + u.size], items[at:at + u.size], ratings[at:at + u.size] = u, i, r
        at += u.size
    if at != n:  # user_counts sums to n and every user gets exactly its count
        raise AssertionError(f"synthetic generator produced {at} ratings, expected {n}")
    return RawRatings(users, items, ratings, source=_source(cfg), truth=truth)


def _source(cfg: Any) -> str:
    return (f"synthetic:{cfg.n_users}x{cfg.n_items}x{cfg.n_ratings}:rank={cfg.rank}:"
            f"noise={cfg.noise}:seed={cfg.seed}")


def write_parquet(cfg: Any, path: str | os.PathLike, *, progress: bool = False,
                  overwrite: bool = False) -> dict:
    """Write ``cfg``'s ratings to Parquet (columns ``user`` int32/int64, ``item``,
    ``rating`` float32; one row group per chunk), atomically: a temporary name in the same
    folder, renamed at the end; nothing is left behind on failure. Returns a summary dict
    (``path, n_ratings, n_users, n_items, seconds``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"{path.parent}: no such directory")
    id_type = pa.int32() if max(cfg.n_users, cfg.n_items) < 2**31 else pa.int64()
    schema = pa.schema([("user", id_type), ("item", id_type), ("rating", pa.float32())],
                       metadata={b"svdfill.synthetic": _source(cfg).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    n = 0
    users_seen = np.zeros(cfg.n_users, dtype=bool)
    items_seen = np.zeros(cfg.n_items, dtype=bool)
    bar = tqdm(total=cfg.n_ratings, unit="rating", unit_scale=True, disable=not progress,
               desc="synth", dynamic_ncols=True)
    try:
        with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
            for u, i, r in iter_chunks(cfg):
                users_seen[u] = True
                items_seen[i] = True
                writer.write_table(pa.table({
                    "user": pa.array(u.astype(id_type.to_pandas_dtype(), copy=False)),
                    "item": pa.array(i.astype(id_type.to_pandas_dtype(), copy=False)),
                    "rating": pa.array(r),
                }, schema=schema))
                n += u.size
                bar.update(u.size)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"path": str(path), "n_ratings": n, "n_users": int(users_seen.sum()),
            "n_items": int(items_seen.sum()), "seconds": time.perf_counter() - t0}


def noise_floor_rmse(raw: RawRatings) -> float:
    """RMSE of the planted model on its own ratings (≈ σ): the best any model can do."""
    if raw.truth is None:
        raise ValueError("no planted truth: not synthetic data")
    err = raw.truth.predict(raw.users, raw.items) - raw.ratings.astype(np.float64)
    return float(math.sqrt(np.mean(err * err)))


def oracle_rmse(raw: RawRatings, train_idx: Any, val_idx: Any) -> float:
    """Validation RMSE of the *oracle* fit: every item's factors and bias and μ are the
    planted truth; each user's p_u and b_u are the exact posterior mean given their train
    ratings (ridge with the planted prior). No trainer can expect to beat this on average,
    so it is the honest target for "near σ": ≈ σ·sqrt(1 + (r+1)/n_u) for a user with n_u
    train ratings, above σ when users have few ratings."""
    t = raw.truth
    if t is None:
        raise ValueError("no planted truth: not synthetic data")
    tr = np.asarray(train_idx, dtype=np.int64)
    va = np.asarray(val_idx, dtype=np.int64)
    U, r = t.user_factors.shape
    s2 = float((INTERACTION_VAR / r) ** 0.5)
    noise2 = max(t.noise ** 2, 1e-12)
    lam = torch.tensor([noise2 / s2] * r + [noise2 / USER_BIAS_STD ** 2], dtype=torch.float64)
    A = torch.diag(lam).expand(U, r + 1, r + 1).clone()
    b = torch.zeros(U, r + 1, dtype=torch.float64)
    Qt = torch.cat([torch.from_numpy(t.item_factors).double(), torch.ones(t.item_factors.shape[0], 1,
                                                                          dtype=torch.float64)], 1)
    for a in range(0, tr.size, 1 << 15):
        sel = tr[a:a + (1 << 15)]
        u = torch.from_numpy(raw.users[sel].astype(np.int64))
        i = torch.from_numpy(raw.items[sel].astype(np.int64))
        q = Qt[i]
        resid = torch.from_numpy(raw.ratings[sel].astype(np.float64)) - t.global_mean - torch.from_numpy(
            t.item_bias.astype(np.float64))[i]
        A.index_add_(0, u, q[:, :, None] * q[:, None, :])
        b.index_add_(0, u, q * resid[:, None])
    x = torch.linalg.solve(A, b)  # [U, r+1]: p_u and b_u
    u = torch.from_numpy(raw.users[va].astype(np.int64))
    i = torch.from_numpy(raw.items[va].astype(np.int64))
    pred = (x[u] * Qt[i]).sum(1) + t.global_mean + torch.from_numpy(t.item_bias.astype(np.float64))[i]
    err = pred - torch.from_numpy(raw.ratings[va].astype(np.float64))
    return float(torch.sqrt((err * err).mean()))
