"""data/split.py: seeded hold-out splits and cold-pair counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.data.dataset import Ratings
from svdfill.data.split import cold_counts, cold_mask, split, split_indices


def make(n_users=50, n_items=30, n=2000, seed=0) -> Ratings:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n) ** 1  # some users get few ratings
    users = np.minimum(users, rng.integers(0, n_users, n))
    return Ratings.from_arrays(users, rng.integers(0, n_items, n), rng.random(n) * 4 + 1,
                               n_users, n_items)


@pytest.mark.parametrize("how", ["random", "per_user"])
def test_partition_and_determinism(how):
    r = make()
    tr, va = split_indices(r, how=how, fraction=0.2, seed=3)
    assert tr.dtype == va.dtype == torch.int64
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(len(r)))
    assert bool((tr[1:] > tr[:-1]).all()) and bool((va[1:] > va[:-1]).all())
    tr2, va2 = split_indices(r, how=how, fraction=0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = split_indices(r, how=how, fraction=0.2, seed=4)
    assert not torch.equal(va, va3)
    assert abs(len(va) - 0.2 * len(r)) < (1 if how == "random" else 0.05 * len(r))
    train, val = split(r, how=how, fraction=0.2, seed=3)
    assert torch.equal(train.ratings, r.ratings[tr]) and torch.equal(val.users, r.users[va])
    assert (train.n_users, train.n_items) == (r.n_users, r.n_items)


@pytest.mark.parametrize("n,m", [(6, 2), (6, 4), (7, 1), (7, 6), (5, 0), (5, 5)])
def test_large_split_sample_is_uniform_over_subsets_of_its_size(n, m):
    """The large-data hold-out draw: always exactly m, and every m-subset about equally
    often (chi-square over the C(n, m) subsets, with a wide margin)."""
    from itertools import combinations
    from math import comb

    from svdfill.data.split import _exact_size_sample

    runs = 1000 * comb(n, m)
    seen = {c: 0 for c in combinations(range(n), m)}
    rng = np.random.default_rng(n * 10 + m)
    for _ in range(runs):
        v = _exact_size_sample(n, m, rng)
        seen[tuple(np.flatnonzero(v).tolist())] += 1  # KeyError if the size were wrong
    df = len(seen) - 1
    expect = runs / len(seen)
    chi2 = sum((c - expect) ** 2 / expect for c in seen.values())
    assert chi2 <= df + 6 * (2 * df) ** 0.5 + 1, (chi2, df)


def test_large_split_sample_marginals_on_both_correction_sides():
    """n = 64, m = 3: the Bernoulli draw overshoots or undershoots; the surplus comes off the
    sparse side (listed) or goes onto the dense side (rejection draws). Either way each
    index is held out with probability m/n."""
    from svdfill.data.split import _exact_size_sample

    n, m, runs = 64, 3, 8000
    hits = np.zeros(n)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        v = _exact_size_sample(n, m, rng)
        assert int(v.sum()) == m
        hits += v
    expect = runs * m / n
    chi2 = float(((hits - expect) ** 2 / expect).sum())
    assert chi2 <= 63 + 6 * (2 * 63) ** 0.5, chi2


def test_large_data_split_keeps_the_contract(monkeypatch):
    """Above LARGE_SPLIT ratings the random split takes the fast draw: still sorted,
    disjoint, exactly round(fraction·n), seeded; the small data's split is untouched."""
    import svdfill.data.split as split_mod

    r = make(n=5000)
    small = split_indices(r, fraction=0.1, seed=2)
    monkeypatch.setattr(split_mod, "LARGE_SPLIT", 1000)
    tr, va = split_indices(r, fraction=0.1, seed=2)
    assert len(va) == 500 and torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(5000))
    assert bool((va[1:] > va[:-1]).all())
    assert torch.equal(va, split_indices(r, fraction=0.1, seed=2)[1])
    assert not torch.equal(va, split_indices(r, fraction=0.1, seed=3)[1])
    assert not torch.equal(va, small[1])
    monkeypatch.undo()
    assert torch.equal(split_indices(r, fraction=0.1, seed=2)[1], small[1])


def test_random_fraction_is_exact_and_zero_fraction():
    r = make(n=1000)
    assert len(split(r, fraction=0.1, seed=0)[1]) == 100
    tr, va = split(r, fraction=0.0, seed=0)
    assert len(va) == 0 and len(tr) == len(r)
    with pytest.raises(ValueError):
        split(r, fraction=1.0)
    with pytest.raises(ValueError):
        split(r, how="by_time")


def test_per_user_keeps_one_in_train():
    r = make(n_users=200, n=1500, seed=1)
    counts = torch.bincount(r.users.long(), minlength=r.n_users)
    for seed in range(5):
        train, val = split(r, how="per_user", fraction=0.5, seed=seed)
        tc = torch.bincount(train.users.long(), minlength=r.n_users)
        vc = torch.bincount(val.users.long(), minlength=r.n_users)
        assert bool((tc[counts >= 1] >= 1).all())  # everybody keeps ≥ 1 rating in train
        assert bool((vc[counts == 1] == 0).all())
        assert bool((vc[counts >= 4] >= 1).all())  # ≥ 4 ratings at 50%: at least one held out
        assert cold_counts(train, val)["cold_users"] == 0
        # per user: held out ≈ fraction of count (floor or ceil of it, capped at count-1)
        lo = torch.floor(0.5 * counts.double())
        hi = torch.minimum(torch.ceil(0.5 * counts.double()), (counts - 1).clamp(min=0).double())
        assert bool(((vc >= torch.minimum(lo, hi)) & (vc <= hi)).all())


def test_cold_counts_match_brute_force():
    rng = np.random.default_rng(5)
    train = Ratings.from_arrays(rng.integers(0, 20, 40), rng.integers(0, 15, 40), np.ones(40), 30, 20)
    val = Ratings.from_arrays(rng.integers(0, 30, 60), rng.integers(0, 20, 60), np.ones(60), 30, 20)
    tu, ti = set(train.users.tolist()), set(train.items.tolist())
    cu = [u not in tu for u in val.users.tolist()]
    ci = [i not in ti for i in val.items.tolist()]
    mu, mi = cold_mask(train, val)
    assert mu.tolist() == cu and mi.tolist() == ci
    assert cold_counts(train, val) == {"cold_users": sum(cu), "cold_items": sum(ci),
                                       "cold_pairs": sum(a or b for a, b in zip(cu, ci))}


def test_ml100k_split(ml100k_path):
    from svdfill.data.dataset import encode
    from svdfill.data.readers import read_ratings

    r, _ = encode(read_ratings(ml100k_path))
    train, val = split(r, fraction=0.1, seed=0)
    assert (len(train), len(val)) == (90_000, 10_000)
    c = cold_counts(train, val)
    assert 0 <= c["cold_pairs"] < 100  # a handful of rare items only
