"""Seeded train/validation hold-out splits, and the cold-pair count of a split.

Every split is a pure function of (ratings, fraction, seed[, timestamps, cutoff]): numpy's
PCG64 stream, no global RNG, no dependence on the device or thread count.
"""

from __future__ import annotations

import numpy as np
import torch

from svdfill.data.dataset import Ratings

HOW = ("random", "per_user", "time")


def split_indices(ratings: Ratings, *, how: str = "random", fraction: float = 0.1,
                  seed: int = 0, cutoff: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): int64 CPU tensors, each sorted ascending, disjoint, together
    ``0..n-1``.

    random: ``round(fraction·n)`` ratings drawn uniformly without replacement.
    per_user: each user holds out about ``fraction`` of their own ratings (stochastic
    rounding of ``fraction·count``, so the total is ≈ ``fraction·n``), but never their last
    one: every user with ≥ 1 rating keeps ≥ 1 in train (users with 1 rating hold out none).
    time (needs ``ratings.timestamps``): without ``cutoff``, each user holds out as many as
    per_user would (the same stochastic rounding, the same ≥ 1 kept), but their latest ones:
    ordered by (timestamp, position in the file), the last ``want`` go to validation, so a
    user's every held-out rating is at least as late as every one they train on and equal
    times are broken by file order. With ``cutoff`` (Unix seconds): every rating at or after
    it is held out, whoever rated it (``fraction`` and ``seed`` unused; users with no rating
    before it are cold in validation).
    """
    if how not in HOW:
        raise ValueError(f"unknown split {how!r}; expected one of {', '.join(HOW)}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    if cutoff is not None and how != "time":
        raise ValueError(f"a cut-off time is for the time split, not {how!r}")
    n = len(ratings)
    if how == "random":
        is_val = random_val_mask(n, fraction, seed)
    elif how == "time":
        if ratings.timestamps is None:
            raise ValueError("the time split needs ratings with timestamps (read with "
                             "data.split = 'time' so the reader keeps them)")
        ts = ratings.timestamps.cpu().numpy().astype(np.int64)
        if cutoff is not None:
            is_val = ts >= int(cutoff)
        else:
            is_val = _latest_mask(ratings.users.cpu().numpy().astype(np.int64), ts,
                                  ratings.n_users, fraction, _rng(seed))
    else:
        is_val = _per_user_mask(ratings.users.cpu().numpy().astype(np.int64), ratings.n_users,
                                fraction, _rng(seed))
    val_idx = torch.from_numpy(np.flatnonzero(is_val).astype(np.int64))
    train_idx = torch.from_numpy(np.flatnonzero(~is_val).astype(np.int64))
    return train_idx, val_idx


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117]))


def random_val_mask(n: int, fraction: float, seed: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """bool [hi − lo]: which of the ratings ``lo..hi−1`` of ``n`` (in dataset order) the
    random split holds out; ``round(fraction·n)`` of all ``n``. A function of ``(n, fraction,
    seed)`` alone, so ranks that each hold a range of a dataset agree on the split of every
    rating, and a rank computes only its own range (memory O(hi − lo) above
    :data:`LARGE_SPLIT`, not O(n)). ``lo``/``hi`` default to the whole dataset."""
    hi = n if hi is None else int(hi)
    lo = int(lo)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"range [{lo}, {hi}) outside 0..{n}")
    n_val = int(round(fraction * n))
    if n > LARGE_SPLIT:
        return _chunked_mask(n, n_val, seed, lo, hi)
    rng = _rng(seed)
    val = np.sort(rng.permutation(n)[:n_val]) if n_val else np.zeros(0, dtype=np.int64)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return is_val if (lo, hi) == (0, n) else is_val[lo:hi].copy()


LARGE_SPLIT = 1 << 24
"""Above this many ratings the random split is drawn chunk by chunk
(:func:`_chunked_mask`) instead of from one permutation of all ``n``: a permutation of
100M indices takes ~8 s on one core, and every rank of a sharded read would need all of it.
Smaller data keeps the permutation's split, which every figure recorded on MovieLens and
FilmTrust was measured with."""

SPLIT_CHUNK = 1 << 20
"""Ratings per chunk of the large-data random split."""


def _chunked_mask(n: int, m: int, seed: int, lo: int, hi: int) -> np.ndarray:
    """bool [hi − lo] of the large-data hold-out of exactly ``m`` of ``n`` ratings.

    The ratings are cut into chunks of :data:`SPLIT_CHUNK` in dataset order; chunk ``c``
    (ratings ``[a, b)``) holds out exactly ``⌊m·b/n⌋ − ⌊m·a/n⌋`` of its ratings (its share,
    the shares summing to ``m``), a uniform subset of that size drawn by a generator seeded
    with ``(seed, c)``. So any rank draws its own chunks alone, in memory of its range plus
    one chunk. The law is a stratified one — every rating is held out with probability
    within ``1/SPLIT_CHUNK`` of ``m/n``, and the hold-out is spread evenly over the file —
    rather than uniform over all m-subsets; for a validation split that is no worse."""
    out = np.zeros(hi - lo, dtype=bool)
    if hi <= lo or m == 0:
        return out
    for c in range(lo // SPLIT_CHUNK, -(-hi // SPLIT_CHUNK)):
        a, b = c * SPLIT_CHUNK, min(n, (c + 1) * SPLIT_CHUNK)
        q = (m * b) // n - (m * a) // n  # Python ints: no overflow at 10^10 × 10^10
        if q == 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117, c]))
        pos = rng.choice(b - a, q, replace=False, shuffle=False) + a
        pos = pos[(pos >= lo) & (pos < hi)]
        out[pos - lo] = True
    return out


def _per_user_mask(users: np.ndarray, n_users: int, fraction: float,
                   rng: np.random.Generator) -> np.ndarray:
    n = users.shape[0]
    counts = np.bincount(users, minlength=n_users)
    want = np.floor(fraction * counts + rng.random(n_users)).astype(np.int64)
    want = np.minimum(want, np.maximum(counts - 1, 0))
    # rank of each rating within its user under a random order: sort by (user, random key)
    order = np.lexsort((rng.random(n), users))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)
    is_val = np.zeros(n, dtype=bool)
    is_val[order] = rank < want[users[order]]
    return is_val


def _latest_mask(users: np.ndarray, ts: np.ndarray, n_users: int, fraction: float,
                 rng: np.random.Generator) -> np.ndarray:
    """bool [n]: each user's latest ``want`` ratings (users, ts: int64 [n]); ``want`` drawn
    as :func:`_per_user_mask` draws it (one uniform per user, in user order)."""
    n = users.shape[0]
    counts = np.bincount(users, minlength=n_users)
    want = np.floor(fraction * counts + rng.random(n_users)).astype(np.int64)
    want = np.minimum(want, np.maximum(counts - 1, 0))
    # by user, then time, then file position: a stable order, so equal times keep file order
    order = np.lexsort((np.arange(n), ts, users))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)  # 0 = the user's earliest
    is_val = np.zeros(n, dtype=bool)
    su = users[order]
    is_val[order] = rank >= counts[su] - want[su]
    return is_val


# -- the same masks where each rank holds every rating of some users -------------------------

def _draws_at(rng: np.random.Generator, n: int, positions: np.ndarray,
              chunk: int = 1 << 22) -> np.ndarray:
    """``rng.random(n)[positions]`` without the n-vector: the stream is drawn in chunks (the
    same float64 sequence) and only ``positions`` (int64, ascending) are kept."""
    out = np.empty(positions.size, dtype=np.float64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        vals = rng.random(hi - lo)
        a, b = np.searchsorted(positions, [lo, hi])
        out[a:b] = vals[positions[a:b] - lo]
    return out


def user_split_mask(how: str, users: np.ndarray, positions: np.ndarray, n: int, n_users: int, *,
                    fraction: float, seed: int, timestamps: np.ndarray | None = None,
                    cutoff: int | None = None) -> np.ndarray:
    """:func:`split_indices`' hold-out mask (bool [m]) for ``m`` of the ``n`` ratings, given
    as ``users`` int64 [m] and their ``positions`` in the whole dataset (int64 [m],
    ascending), where every rating of each user present is among them (a rank that received
    whole users). Equal to the one-process mask at those positions for every ``how``;
    memory O(m + n_users), not O(n)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size > 1 and np.any(positions[1:] <= positions[:-1]):
        raise ValueError("positions must be strictly ascending")
    if how == "random":
        return random_val_mask(n, fraction, seed)[positions]
    if how == "time" and cutoff is not None:
        return np.asarray(timestamps, dtype=np.int64) >= int(cutoff)
    if how not in ("per_user", "time"):
        raise ValueError(f"unknown split {how!r}; expected one of {', '.join(HOW)}")
    rng = _rng(seed)
    m = users.shape[0]
    counts = np.bincount(users, minlength=n_users)
    want = np.floor(fraction * counts + rng.random(n_users)).astype(np.int64)
    want = np.minimum(want, np.maximum(counts - 1, 0))
    if how == "per_user":
        keys = _draws_at(rng, n, positions)  # the one-process order's random key of each rating
        order = np.lexsort((keys, users))  # ties keep position order, as one process does
    else:
        order = np.lexsort((positions, np.asarray(timestamps, dtype=np.int64), users))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(m, dtype=np.int64) - np.repeat(starts, counts)
    su = users[order]
    is_val = np.zeros(m, dtype=bool)
    is_val[order] = rank < want[su] if how == "per_user" else rank >= counts[su] - want[su]
    return is_val


def split(ratings: Ratings, *, how: str = "random", fraction: float = 0.1,
          seed: int = 0, cutoff: int | None = None) -> tuple[Ratings, Ratings]:
    """(train, val) :class:`Ratings` subsets (rows in file order, full id-space sizes,
    timestamps carried when present); see :func:`split_indices` for the rules and for the
    index form."""
    train_idx, val_idx = split_indices(ratings, how=how, fraction=fraction, seed=seed,
                                       cutoff=cutoff)
    dev = ratings.device
    return ratings.subset(train_idx.to(dev)), ratings.subset(val_idx.to(dev))


def describe(how: str, fraction: float, cutoff: int | None = None) -> str:
    """The split in words, for the training log: ``"time split: each user's latest 10%"``."""
    if how == "time" and cutoff is not None:
        import datetime as dt

        when = dt.datetime.fromtimestamp(int(cutoff), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"time split: ratings at or after {when} (Unix {int(cutoff)})"
    what = {"random": "random split: {:g}% of all ratings",
            "per_user": "per-user split: {:g}% of each user's ratings",
            "time": "time split: each user's latest {:g}%"}[how]
    return what.format(100 * fraction)


def cold_mask(train: Ratings, val: Ratings) -> tuple[torch.Tensor, torch.Tensor]:
    """(cold_user bool [len(val)], cold_item bool [len(val)]): validation pairs whose user
    (item) has no rating in ``train``. Such pairs can only be predicted from μ and the bias
    that is known."""
    seen_u = torch.zeros(max(train.n_users, val.n_users), dtype=torch.bool, device=val.device)
    seen_i = torch.zeros(max(train.n_items, val.n_items), dtype=torch.bool, device=val.device)
    seen_u[train.users.long().to(val.device)] = True
    seen_i[train.items.long().to(val.device)] = True
    return ~seen_u[val.users.long()], ~seen_i[val.items.long()]


def cold_counts(train: Ratings, val: Ratings) -> dict[str, int]:
    """Counts of cold validation pairs: ``{"cold_users": pairs whose user is unseen in
    train, "cold_items": … item unseen, "cold_pairs": either}``."""
    cu, ci = cold_mask(train, val)
    return {"cold_users": int(cu.sum()), "cold_items": int(ci.sum()), "cold_pairs": int((cu | ci).sum())}
