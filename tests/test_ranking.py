"""kernels.ranking against a per-user Python reference on random lists and held-out sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svdfill.kernels.ranking import evaluate_topk, ranking_metrics


def reference(topk, users, hu, hi, hr, k, threshold):
    rel = {}
    for u, i, r in zip(hu, hi, hr):
        if r >= threshold:
            rel.setdefault(int(u), set()).add(int(i))
    ps, rs, ns = [], [], []
    for row, u in zip(topk, users):
        R = rel.get(int(u))
        if not R:
            continue
        lst = [int(x) for x in row[:k]]
        hits = [x in R and x >= 0 for x in lst]
        ps.append(sum(hits) / k)
        rs.append(sum(hits) / len(R))
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(R))))
        ns.append(dcg / idcg)
    return np.mean(ps), np.mean(rs), np.mean(ns), len(ps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, K = 40, 30, 8
    topk = np.stack([rng.permutation(n_items)[:K] for _ in range(n_users)])
    topk[rng.random(topk.shape) < 0.1] = -1  # some padding (reference: never a hit)
    topk = np.sort(np.where(topk < 0, 10**6, topk), axis=1)
    topk = np.where(topk == 10**6, -1, topk)
    users = rng.permutation(60)[:n_users]
    m = 500
    hu, hi = rng.integers(0, 60, m), rng.integers(0, n_items, m)
    hr = rng.integers(1, 6, m).astype(np.float32)
    t = torch.from_numpy
    for k in (1, 3, K):
        got = ranking_metrics(t(topk), t(users), t(hu), t(hi), t(hr), k=k)
        p, r, n, cnt = reference(topk, users, hu, hi, hr, k, 4.0)
        assert got["users"] == cnt and got["k"] == k
        assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
        assert got["ndcg"] == pytest.approx(n)


def test_perfect_and_empty_lists():
    topk = torch.tensor([[3, 5, -1], [1, 2, 0]])
    users = torch.tensor([0, 1])
    hu, hi, hr = torch.tensor([0, 0, 1]), torch.tensor([3, 5, 7]), torch.tensor([5.0, 4.0, 3.0])
    got = ranking_metrics(topk, users, hu, hi, hr)
    # user 1 has no relevant item (3.0 < 4): only user 0 counts; both relevant items at ranks 1-2
    assert got["users"] == 1 and got["recall"] == 1.0 and got["ndcg"] == pytest.approx(1.0)
    assert got["precision"] == pytest.approx(2 / 3)
    none = ranking_metrics(topk, users, hu, hi, torch.tensor([1.0, 1.0, 1.0]))
    assert none["users"] == 0 and math.isnan(none["ndcg"])
    with pytest.raises(ValueError):
        ranking_metrics(topk, users, hu, hi, hr, k=4)


def test_evaluate_topk_excludes_seen_and_finds_planted_items():
    # item scores = item index: every user's top list is the highest unseen ids
    n_users, n_items = 5, 10
    state = {"user_factors": torch.ones(n_users, 1), "item_factors": torch.arange(n_items, dtype=torch.float32)[:, None],
             "user_bias": torch.zeros(n_users), "item_bias": torch.zeros(n_items), "global_mean": torch.tensor(0.0)}
    seen = (torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([9], dtype=torch.int32))  # user 0 saw item 9
    hu = torch.tensor([0, 1, 2, -1])
    hi = torch.tensor([8, 0, 9, 3])
    hr = torch.tensor([5.0, 5.0, 4.0, 5.0])
    got = evaluate_topk(state, hu, hi, hr, 2, seen=seen)
    # user 0: top-2 = [8, 7] -> hit at rank 1; user 1: [9, 8] -> miss; user 2: [9, 8] -> hit at 1
    assert got["users"] == 3
    assert got["precision"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert got["recall"] == pytest.approx(2 / 3) and got["ndcg"] == pytest.approx(2 / 3)


def test_svdfill_eval_topk_on_a_run(tmp_path, capsys):
    """`svdfill eval --topk` end to end: a run directory, a held-out CSV, JSON out."""
    import argparse
    import json

    from svdfill.launch import cmd_eval
    from svdfill.launch.errors import run_reporting_errors
    from tests.test_cli_fill import make_run

    run = make_run(tmp_path, n_users=20, n_items=15, str_items=False)
    rng = np.random.default_rng(0)
    lines = ["user,item,rating"] + [f"{1000 + 3 * u},{500 + 7 * i},{rng.integers(1, 6)}"
                                    for u, i in {(int(u), int(i)) for u, i in rng.integers(0, [20, 15], (60, 2))}]
    test = tmp_path / "test.csv"
    test.write_text("\n".join(lines) + "\n")
    p = argparse.ArgumentParser()
    cmd_eval.add_arguments(p)
    args = p.parse_args(["--model", str(run), "--ratings", str(test), "--topk", "5", "--quiet"])
    assert run_reporting_errors(lambda: cmd_eval.main(args)) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rmse", "precision@5", "recall@5", "ndcg@5", "ranking_users"} <= set(out)
    assert 0 <= out["precision@5"] <= 1 and 0 <= out["ndcg@5"] <= 1 and out["ranking_users"] > 0
    args = p.parse_args(["--model", str(run), "--ratings", str(test), "--topk", "0"])
    assert run_reporting_errors(lambda: cmd_eval.main(args)) == 2
