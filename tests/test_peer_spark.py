"""bench/peer_spark.py: Spark MLlib ALS as a bench peer, against a real local Spark (JVM)
on loopback — the model written from svdfill's factors recommends what fill_topk ranks, and
ALS fits score every test pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.bench.peer_spark import spark_available

why = spark_available()
pytestmark = pytest.mark.skipif(why is not None, reason=f"Spark peer unavailable: {why}")


@pytest.fixture
def spark():  # per test: after the first JVM start a new session takes well under a second
    from svdfill.bench.peer_spark import local_spark

    with local_spark(threads=2, memory="2g") as s:
        yield s


def test_session_stays_on_loopback(spark):
    assert spark.conf.get("spark.driver.host") == "127.0.0.1"
    assert spark.conf.get("spark.driver.bindAddress") == "127.0.0.1"
    assert spark.start_seconds > 0


def test_recommend_all_equals_fill_topk_on_the_same_factors(spark):
    """Ragged sizes (U=37 not a block multiple, rank 5+1); Gaussian factors, so no ties."""
    from svdfill.kernels.fill import fill_topk
    from svdfill.bench.fill import synthetic_model
    from svdfill.bench.peer_spark import recommend_all

    state = synthetic_model(37, 53, 5, seed=3)
    res = recommend_all(spark, state, 7)
    scores, ours = fill_topk(state["user_factors"], state["item_factors"], state["user_bias"],
                             state["item_bias"], 0.0, 7, None)
    assert res["items"].shape == (37, 7) and res["seconds"] > 0
    assert torch.equal(torch.from_numpy(res["items"]), ours)
    # the ranking really depends on the folded item bias: without it the lists differ
    _, no_bias = fill_topk(state["user_factors"], state["item_factors"], state["user_bias"],
                           torch.zeros(53), 0.0, 7, None)
    assert not torch.equal(no_bias, ours)


def test_fit_als_scores_every_test_pair(spark):
    from svdfill.data.dataset import Ratings

    rng = np.random.default_rng(0)
    U, I, n = 60, 40, 1500
    P, Q = rng.normal(size=(U, 3)), rng.normal(size=(I, 3))
    u, i = rng.integers(0, U, n), rng.integers(0, I, n)
    key = np.unique(u * I + i)
    u, i = key // I, key % I
    r = np.clip(3 + (P[u] * Q[i]).sum(1) + rng.normal(0, 0.3, u.size), 1, 5)
    allr = Ratings.from_arrays(u, i, r, n_users=U + 1, n_items=I)
    order = torch.from_numpy(rng.permutation(len(allr)))
    cut = int(0.8 * len(allr))
    train, test = allr.subset(order[:cut]), allr.subset(order[cut:])
    # one test pair of a user Spark never saw: predicted as the training mean
    test = test.cat(Ratings.from_arrays([U], [0], [4.0], n_users=U + 1, n_items=I))
    from svdfill.bench.peer_spark import fit_als

    res = fit_als(spark, train, test, 1.0, 5.0, rank=3, max_iter=10, reg=0.05, seed=0)
    pred = res["predictions"]
    assert pred.shape == (len(test),) and np.isfinite(pred).all()
    assert res["cold"] >= 1 and res["fit_seconds"] > 0
    assert pred[-1] == pytest.approx(float(train.ratings.double().mean()))
    target = test.ratings.double().numpy()
    rmse = float(np.sqrt(np.mean((pred - target) ** 2)))
    baseline = float(np.sqrt(np.mean((float(train.ratings.double().mean()) - target) ** 2)))
    assert rmse < 0.8 * baseline, (rmse, baseline)


def test_bench_fill_prints_the_spark_row(capsys):
    import argparse

    from svdfill.bench import fill as bench_fill

    parser = argparse.ArgumentParser()
    bench_fill.add_arguments(parser)
    args = parser.parse_args(["--shape", "tiny", "--device", "cpu", "--peer", "spark", "--no-export"])
    assert bench_fill.main(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {bench_fill.SPARK_LABEL}"))
    assert "same items as fill_topk without it: 100.0%" in row
    assert "fill_topk vs Spark ALS" in out


def test_bench_accuracy_adds_the_spark_rows(ml100k_path, tmp_path):
    """`bench accuracy --peer spark` on real ML-100K (a quick sample): one Spark session for
    every seed, the defaults row and the rank-matched row, each scored on every test pair."""
    import argparse
    import json

    from svdfill.bench import accuracy as ba

    parser = argparse.ArgumentParser()
    ba.add_arguments(parser)
    out = tmp_path / "acc.json"
    args = parser.parse_args(["--data", "ml-100k", "--ratings", str(ml100k_path), "--seeds", "0,1",
                              "--quick", "--no-surprise", "--peer", "spark", "--quiet",
                              "--json", str(out)])
    assert ba.main(args) == 0
    res = json.loads(out.read_text())
    assert res["spark"] == "ran"
    spark_rows = [r for r in res["table"] if r["method"].startswith("Spark ALS")]
    assert [r["method"].split(",")[0] for r in spark_rows] == ["Spark ALS (defaults: rank 10", "Spark ALS (rank 8"]
    for row in spark_rows:
        assert row["seeds"] == 2 and row["fit_seconds"] > 0 and 0.3 < row["rmse"] < 3.0
