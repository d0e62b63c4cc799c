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


@pytest.mark.parametrize("n,frac", [(5_000, 0.1), (4_099, 0.2), (1_024, 0.01), (3_000, 0.0)])
def test_large_split_is_exact_seeded_and_drawn_per_range(monkeypatch, n, frac):
    """The chunked draw: exactly round(fraction·n) in all, each chunk its floor share, and
    any range [lo, hi) drawn alone equals that range of the whole mask (what a rank of a
    sharded read computes), for ragged ranges across chunk edges."""
    import svdfill.data.split as S

    monkeypatch.setattr(S, "LARGE_SPLIT", 100)
    monkeypatch.setattr(S, "SPLIT_CHUNK", 256)
    m = int(round(frac * n))
    whole = S.random_val_mask(n, frac, 7)
    assert whole.shape == (n,) and int(whole.sum()) == m
    for c in range(-(-n // 256)):
        a, b = 256 * c, min(n, 256 * (c + 1))
        assert int(whole[a:b].sum()) == (m * b) // n - (m * a) // n
    for lo, hi in [(0, n), (0, 1), (255, 257), (300, 1_000), (n - 1, n), (n, n), (17, n - 3)]:
        assert np.array_equal(S.random_val_mask(n, frac, 7, lo, hi), whole[lo:hi]), (lo, hi)
    assert np.array_equal(S.random_val_mask(n, frac, 7), whole)
    if m:
        assert not np.array_equal(S.random_val_mask(n, frac, 8), whole)
    with pytest.raises(ValueError, match="outside"):
        S.random_val_mask(n, frac, 7, 5, n + 1)


def test_large_split_holds_out_each_rating_with_its_share(monkeypatch):
    """Within a chunk every position is equally likely (chi-square over seeds)."""
    import svdfill.data.split as S

    monkeypatch.setattr(S, "LARGE_SPLIT", 10)
    monkeypatch.setattr(S, "SPLIT_CHUNK", 64)
    n, frac, runs = 128, 3 / 64, 4000
    hits = np.zeros(n)
    for seed in range(runs):
        hits += S.random_val_mask(n, frac, seed)
    expect = runs * 3 / 64
    chi2 = float(((hits - expect) ** 2 / expect).sum())
    assert chi2 <= 127 + 6 * (2 * 127) ** 0.5, chi2


def test_small_split_ranges_are_slices_of_the_permutation_split():
    from svdfill.data.split import random_val_mask

    whole = random_val_mask(1000, 0.1, 3)
    assert np.array_equal(random_val_mask(1000, 0.1, 3, 250, 600), whole[250:600])


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


# ---- data.split = "time" ----------------------------------------------------------------

def with_times(r: Ratings, seed=0, span=50) -> Ratings:
    """``r`` with int64 timestamps drawn from a small range (so equal times occur)."""
    ts = np.random.default_rng(seed + 1).integers(0, span, len(r))
    return Ratings(r.users, r.items, r.ratings, r.n_users, r.n_items, torch.from_numpy(ts))


def _check_latest(r: Ratings, tr: torch.Tensor, va: torch.Tensor) -> None:
    """Every held-out rating of a user is at least as late as every one they train on (and,
    at equal times, later in the file), and every user with ratings keeps one in train."""
    u, ts = r.users.numpy(), r.timestamps.numpy()
    key = ts.astype(np.float64) * (len(r) + 1) + np.arange(len(r))  # (time, file position)
    for user in np.unique(u):
        t_rows = tr.numpy()[u[tr.numpy()] == user]
        v_rows = va.numpy()[u[va.numpy()] == user]
        assert t_rows.size >= 1
        if v_rows.size:
            assert ts[v_rows].min() >= ts[t_rows].max()
            assert key[v_rows].min() > key[t_rows].max()


def test_time_split_holds_out_each_users_latest_fraction():
    r = with_times(make())
    tr, va = split_indices(r, how="time", fraction=0.2, seed=3)
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(len(r)))
    _check_latest(r, tr, va)
    # the per-user counts are exactly the per_user split's (the same stochastic rounding)
    _, va_pu = split_indices(r, how="per_user", fraction=0.2, seed=3)
    nu = r.n_users
    assert np.array_equal(np.bincount(r.users[va].numpy(), minlength=nu),
                          np.bincount(r.users[va_pu].numpy(), minlength=nu))
    tr2, va2 = split_indices(r, how="time", fraction=0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)


def test_time_split_ties_follow_file_order():
    # one user, all at the same time: the last rows of the file are the latest
    r = Ratings.from_arrays(np.zeros(10), np.arange(10), np.ones(10), 1, 10)
    r = Ratings(r.users, r.items, r.ratings, 1, 10, torch.zeros(10, dtype=torch.int64))
    tr, va = split_indices(r, how="time", fraction=0.3, seed=0)
    assert va.tolist() == list(range(10 - len(va), 10)) and len(va) in (3, 4)


def test_time_split_global_cutoff_and_errors():
    r = with_times(make())
    tr, va = split_indices(r, how="time", cutoff=40)
    ts = r.timestamps
    assert bool((ts[va] >= 40).all()) and bool((ts[tr] < 40).all())
    assert len(va) == int((ts >= 40).sum())
    with pytest.raises(ValueError, match="timestamps"):
        split_indices(make(), how="time")
    with pytest.raises(ValueError, match="time split"):
        split_indices(r, how="per_user", cutoff=40)


def test_ratings_carry_timestamps_through_subset_cat_to():
    r = with_times(make(n=20))
    a, b = r.subset(torch.arange(5)), r.subset(torch.arange(5, 20))
    assert torch.equal(a.cat(b).timestamps, r.timestamps)
    assert r.to("cpu").timestamps is r.timestamps
    assert make(n=5).cat(make(n=5)).timestamps is None
    with pytest.raises(ValueError, match="timestamps"):
        Ratings(r.users, r.items, r.ratings, r.n_users, r.n_items, r.timestamps[:3])


def test_random_and_per_user_ignore_timestamps():
    r = make()
    rt = with_times(r)
    for how in ("random", "per_user"):
        for x, y in zip(split_indices(r, how=how, fraction=0.2, seed=5),
                        split_indices(rt, how=how, fraction=0.2, seed=5)):
            assert torch.equal(x, y)


def _ml100k_cfg(path, **data):
    from svdfill.config import DataConfig

    return DataConfig(path=str(path), format="ml-100k", **data)


def test_time_split_on_ml100k(ml100k_path):
    from svdfill.config import parse_split_time
    from svdfill.data.dataset import load_dataset

    r, _ = load_dataset(_ml100k_cfg(ml100k_path, split="time"))
    assert r.timestamps is not None and r.timestamps.dtype == torch.int64
    tr, va = split_indices(r, how="time", fraction=0.1, seed=0)
    _check_latest(r, tr, va)
    counts = np.bincount(r.users.numpy(), minlength=r.n_users)
    held = np.bincount(r.users[va].numpy(), minlength=r.n_users)
    # stochastic rounding: each user holds out floor or ceil of 10% of their count
    assert np.all((held == np.floor(0.1 * counts)) | (held == np.ceil(0.1 * counts)))
    assert abs(len(va) - 0.1 * len(r)) < 0.01 * len(r)
    tr2, va2 = split_indices(r, how="time", fraction=0.1, seed=0)
    assert torch.equal(va, va2)
    # a global cut-off splits exactly at the time (ML-100K spans Sep 1997 – Apr 1998)
    cut = parse_split_time("1998-03-01")
    tr, va = split_indices(r, how="time", cutoff=cut)
    assert bool((r.timestamps[va] >= cut).all()) and bool((r.timestamps[tr] < cut).all())
    assert 0 < len(va) < len(r) and len(va) == int((r.timestamps >= cut).sum())
    # other splits read no timestamps at all (memory of every other run unchanged)
    assert load_dataset(_ml100k_cfg(ml100k_path))[0].timestamps is None


def test_time_split_on_files_without_timestamps_is_a_clear_error(ml1m_path, tmp_path):
    from svdfill.config import DataConfig
    from svdfill.data.dataset import load_dataset
    from svdfill.data.errors import DataError

    with pytest.raises(DataError, match=r"ratings\.dat:1: no timestamp field.*data\.time_col"):
        load_dataset(DataConfig(path=str(ml1m_path), split="time"))
    f = tmp_path / "three.tsv"
    f.write_text("1\t1\t3\n2\t1\t4\n")
    with pytest.raises(DataError, match=r"three\.tsv:1: no timestamp field"):
        load_dataset(_ml100k_cfg(f, split="time"))


def test_train_with_time_split_end_to_end(ml100k_path, tmp_path, capsys):
    import json

    from svdfill.config import BUILTIN_DIR
    from svdfill.launch.cli import main

    toml = (BUILTIN_DIR / "ml-100k.toml").read_text().replace('split = "random"', 'split = "time"')
    cfg = tmp_path / "time.toml"
    cfg.write_text(toml)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--ratings", str(ml100k_path), "--out", str(out),
                 "--epochs", "4"]) == 0
    log = capsys.readouterr().out
    assert "time split: each user's latest 10%" in log
    s = json.loads((out / "summary.json").read_text())
    # every user keeps their earliest ratings in train: only items first rated late are cold
    assert s["split"] == "time split: each user's latest 10%" and s["n_val_cold_users"] == 0
    assert 0.8 < s["val_rmse"] < 1.3


def test_time_split_is_read_per_rank_through_a_user_pass():
    from svdfill.config import DataConfig
    from svdfill.distributed.ingest import needs_user_pass, supported

    assert supported(DataConfig(path="x", split="time")) is None
    assert needs_user_pass(DataConfig(path="x", split="time"))


def test_draws_at_equals_the_whole_stream_in_any_chunking():
    from svdfill.data.split import _draws_at, _rng

    pos = np.array([0, 3, 4, 10, 11, 12, 99], dtype=np.int64)
    whole = _rng(5).random(100)[pos]
    for chunk in (1, 7, 13, 100, 1 << 22):
        assert np.array_equal(_draws_at(_rng(5), 100, pos, chunk=chunk), whole)


@pytest.mark.parametrize("how,cutoff", [("random", None), ("per_user", None), ("time", None),
                                        ("time", 40)])
def test_user_split_mask_on_whole_users_equals_the_one_process_mask(how, cutoff):
    """A rank holding every rating of some users (as after routing by user) computes exactly
    the one-process hold-out at those ratings' positions."""
    import torch

    from svdfill.data.dataset import Ratings
    from svdfill.data.split import split_indices, user_split_mask

    g = np.random.default_rng(11)
    n, n_users = 4000, 257
    users = (g.zipf(1.6, n) % n_users).astype(np.int64)  # skewed: some users with many ratings
    ts = g.integers(0, 60, n).astype(np.int64)  # many equal times: file order breaks ties
    r = Ratings(torch.from_numpy(users.astype(np.int32)), torch.zeros(n, dtype=torch.int32),
                torch.ones(n), n_users, 1, torch.from_numpy(ts))
    _, val = split_indices(r, how=how, fraction=0.2, seed=3, cutoff=cutoff)
    full = np.zeros(n, dtype=bool)
    full[val.numpy()] = True
    for owner in range(3):  # users routed to 3 ranks by id
        pos = np.flatnonzero(users % 3 == owner).astype(np.int64)
        got = user_split_mask(how, users[pos], pos, n, n_users, fraction=0.2, seed=3,
                              timestamps=ts[pos], cutoff=cutoff)
        assert np.array_equal(got, full[pos]), (how, owner)
