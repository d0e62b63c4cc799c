"""data/synth.py and `svdfill synth`: sizes, no repeated pairs, skew, noise floor, Parquet."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from svdfill.config import SynthConfig
from svdfill.data import synth
from svdfill.data.errors import DataError
from svdfill.data.readers import read_ratings
from svdfill.data.synth import (PlantedTruth, generate, item_weights, noise_floor_rmse, oracle_rmse,
                                user_counts, write_parquet)

DENSE = SynthConfig(n_users=3000, n_items=400, n_ratings=150_000, rank=4, noise=0.5, seed=1)
# sparse: below DENSE_MIN_DENSITY, so chunks dedupe by sorting; skewed so some users are heavy
SPARSE = SynthConfig(n_users=20_000, n_items=4000, n_ratings=200_000, rank=3, user_skew=1.0, seed=2)


def pair_keys(raw, n_items):
    return raw.users.astype(np.int64) * n_items + raw.items


@pytest.mark.parametrize("cfg", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_exact_size_no_repeats_and_counts(cfg, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK", 50_000)  # several chunks even at test sizes
    monkeypatch.setattr(synth, "TABLE_MAX", 200_000)
    assert synth._dense(cfg) == (cfg is DENSE)
    raw = generate(cfg)
    assert len(raw) == cfg.n_ratings
    assert raw.users.dtype == raw.items.dtype == np.int64 and raw.ratings.dtype == np.float32
    assert raw.users.min() >= 0 and raw.users.max() < cfg.n_users
    assert raw.items.min() >= 0 and raw.items.max() < cfg.n_items
    keys = pair_keys(raw, cfg.n_items)
    assert len(np.unique(keys)) == len(keys)
    assert np.array_equal(np.bincount(raw.users, minlength=cfg.n_users), user_counts(cfg))
    assert isinstance(raw.truth, PlantedTruth) and raw.truth.user_factors.shape == (cfg.n_users, cfg.rank)
    if cfg is SPARSE:  # the Gumbel path for heavy users really ran
        assert user_counts(cfg).max() > synth._HEAVY_FRACTION * cfg.n_items


def test_threads_do_not_change_the_data(monkeypatch):
    cfg = SynthConfig(n_users=500, n_items=100, n_ratings=20_000, seed=4)
    monkeypatch.setattr(synth, "TABLE_MAX", 5000)  # many chunks
    a = generate(cfg)
    monkeypatch.setattr(synth, "THREADS", 1)
    b = generate(cfg)
    assert np.array_equal(a.users, b.users) and np.array_equal(a.ratings, b.ratings)
    c = generate(SynthConfig(n_users=500, n_items=100, n_ratings=20_000, seed=5))
    assert not np.array_equal(a.items, c.items)


def test_user_counts_capped_and_exact():
    cfg = SynthConfig(n_users=50, n_items=30, n_ratings=1400, user_skew=2.0)  # very heavy head
    c = user_counts(cfg)
    assert c.sum() == 1400 and c.max() == 30 and c.min() >= 0
    raw = generate(cfg)  # users with every item: dense Gumbel rows
    assert len(raw) == 1400 and len(np.unique(pair_keys(raw, 30))) == 1400
    full = generate(SynthConfig(n_users=5, n_items=7, n_ratings=35))
    assert sorted(pair_keys(full, 7).tolist()) == list(range(35))
    with pytest.raises(DataError, match="exceeds"):
        user_counts(SynthConfig(n_users=5, n_items=7, n_ratings=36))
    with pytest.raises(DataError, match="noise"):
        generate(SynthConfig(noise=-1.0))


def test_noise_floor_and_rating_scale():
    raw = generate(DENSE)
    assert noise_floor_rmse(raw) == pytest.approx(DENSE.noise, rel=0.01)
    r = raw.ratings.astype(np.float64)
    assert r.mean() == pytest.approx(DENSE.mean, abs=0.1)
    expect_std = math.sqrt(synth.USER_BIAS_STD ** 2 + synth.ITEM_BIAS_STD ** 2 + synth.INTERACTION_VAR
                           + DENSE.noise ** 2)
    assert r.std() == pytest.approx(expect_std, rel=0.15)
    assert np.mean((r > 1) & (r < 6)) > 0.97  # roughly on a 1..5 scale, unclipped
    clean = generate(SynthConfig(n_users=300, n_items=50, n_ratings=3000, noise=0.0))
    assert noise_floor_rmse(clean) < 1e-5


def test_popularity_and_activity_skew():
    skewed = generate(SynthConfig(n_users=2000, n_items=500, n_ratings=100_000, zipf=1.0, user_skew=0.8))
    flat = generate(SynthConfig(n_users=2000, n_items=500, n_ratings=100_000, zipf=0.0, user_skew=0.0))

    def top_share(ids, n, frac=0.1):
        c = np.sort(np.bincount(ids, minlength=n))[::-1]
        return c[: int(frac * n)].sum() / c.sum()

    assert top_share(skewed.items, 500) > 0.35 and top_share(flat.items, 500) < 0.15
    assert top_share(skewed.users, 2000) > 0.3 and top_share(flat.users, 2000) < 0.12
    # observed item counts follow the planted popularity
    w = item_weights(SynthConfig(n_users=2000, n_items=500, n_ratings=100_000, zipf=1.0, user_skew=0.8))
    counts = np.bincount(skewed.items, minlength=500)
    assert np.corrcoef(np.log(w), np.log(counts + 1))[0, 1] > 0.9


def test_learnable_oracle_near_sigma():
    cfg = SynthConfig(n_users=1500, n_items=300, n_ratings=150_000, rank=4, noise=0.5, seed=3)
    raw = generate(cfg)
    perm = np.random.default_rng(0).permutation(len(raw))
    o = oracle_rmse(raw, perm[15_000:], perm[:15_000])
    # users have ~90 train ratings: floor ≈ σ·sqrt(1 + (r+1)/90) ≈ 1.03σ
    assert cfg.noise * 0.97 < o < cfg.noise * 1.06


def test_parquet_round_trip_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "TABLE_MAX", 100_000)
    cfg = SynthConfig(n_users=800, n_items=300, n_ratings=40_000, seed=7)
    out = tmp_path / "s.parquet"
    info = write_parquet(cfg, out)
    assert info["n_ratings"] == 40_000 and out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]
    back = read_ratings(out)  # default column names user/item/rating, format from the name
    raw = generate(cfg)
    assert np.array_equal(back.users, raw.users) and np.array_equal(back.items, raw.items)
    assert np.array_equal(back.ratings, raw.ratings)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(out).metadata.num_row_groups > 1
    with pytest.raises(FileExistsError):
        write_parquet(cfg, out)
    # a failure mid-way leaves neither the file nor a temporary
    real = synth.iter_chunks

    def failing(cfg_, truth=None):
        it = real(cfg_, truth)
        yield next(it)
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "iter_chunks", failing)
    target = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        write_parquet(cfg, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


def run_cli(argv):
    from svdfill.launch import cmd_synth
    from svdfill.launch.errors import run_reporting_errors

    p = argparse.ArgumentParser()
    cmd_synth.add_arguments(p)
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: cmd_synth.main(args))


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    rc = run_cli(["--out", str(out), "--users", "1k", "--items", "200", "--ratings", "20_000",
                  "--rank", "3", "--noise", "0.3", "--zipf", "0.5", "--seed", "9", "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote 20,000 ratings") and str(out) in line and "\n" not in line
    back = read_ratings(out, format="parquet")
    raw = generate(SynthConfig(n_users=1000, n_items=200, n_ratings=20_000, rank=3, noise=0.3,
                               zipf=0.5, seed=9))
    assert np.array_equal(back.ratings, raw.ratings)
    assert run_cli(["--out", str(out), "--users", "1000", "--quiet"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert run_cli(["--out", str(tmp_path / "x.csv"), "--quiet"]) == 2
    assert run_cli(["--out", str(tmp_path / "y.parquet"), "--users", "2", "--items", "2",
                    "--ratings", "5", "--quiet"]) == 2
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data.synthetic]\nn_users = 100\nn_items = 50\nn_ratings = 1000\n")
    assert run_cli(["--out", str(tmp_path / "z.parquet"), "--config", str(cfg), "--quiet"]) == 0
    assert len(read_ratings(tmp_path / "z.parquet")) == 1000


@pytest.mark.slow
def test_600k_users_parquet_bounded(tmp_path):
    """The 600k-user × 3k-item shape (fewer ratings than the 100M preset): many chunks,
    written and read back through the reader's duplicate check and id maps."""
    cfg = SynthConfig(n_users=600_000, n_items=3000, n_ratings=3_000_000, rank=8, seed=11)
    out = tmp_path / "big.parquet"
    info = write_parquet(cfg, out)
    assert info["n_ratings"] == 3_000_000 and info["n_items"] == 3000
    import pyarrow.parquet as pq

    assert pq.ParquetFile(out).metadata.num_row_groups >= 3
    back = read_ratings(out)
    assert len(back) == 3_000_000
    assert np.array_equal(np.bincount(back.users, minlength=cfg.n_users), user_counts(cfg))
