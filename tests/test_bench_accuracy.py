"""bench/accuracy.py: `svdfill bench accuracy --quick` end to end on real MovieLens
(a seeded sample), the split protocol, and the table."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from svdfill.bench import accuracy as ba


def _args(**kw):
    p = argparse.ArgumentParser()
    ba.add_arguments(p)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        else:
            argv += [flag, str(v)]
    return p.parse_args(argv)


@pytest.mark.slow
def test_quick_bench_end_to_end(ml100k_path, tmp_path, capsys):
    out = tmp_path / "acc.json"
    args = _args(data="ml-100k", ratings=ml100k_path, seeds="0,1", quick=True, json=out, quiet=True)
    assert ba.main(args) == 0
    text = capsys.readouterr().out
    assert "held-out 10% TEST split" in text and "validation fold carved from the training 90%" in text
    res = json.loads(out.read_text())
    methods = [r["method"] for r in res["table"]]
    assert methods[0].startswith("svdfill (") and methods[1].startswith("original recipe (")
    if ba.surprise_available() is None:
        assert any(m.startswith("Surprise SVD (defaults)") for m in methods)
        assert any("n_epochs matched" in m for m in methods)
        assert res["table"][2]["vs_surprise"] == pytest.approx(1.0)
    else:
        assert "Surprise rows skipped" in text
    for row in res["table"]:
        assert row["seeds"] == 2
        assert 0.5 < row["rmse"] < 1.5 and 0.3 < row["mae"] < row["rmse"]
        assert row["fit_seconds"] > 0
    for runs in res["per_seed"].values():
        assert len(runs) == 2 and all(r["rmse"] > 0 for r in runs)


def test_a_ratings_path_with_duplicates_needs_dedupe(filmtrust_path, capsys):
    """--data PATH trains the ml-100k defaults on any file; FilmTrust's 3 duplicate pairs are
    refused unless --dedupe says what to do with them."""
    from svdfill.data.errors import DataError

    with pytest.raises(DataError, match="duplicate"):
        ba.main(_args(data=filmtrust_path, seeds="0", quick=True, quiet=True, no_surprise=True))
    assert ba.main(_args(data=filmtrust_path, seeds="0", quick=True, quiet=True, no_surprise=True,
                         dedupe="mean")) == 0
    text = capsys.readouterr().out
    assert "ratings.txt (4,000 ratings, QUICK sample)" in text and "Surprise rows skipped" in text


def test_svdfill_never_sees_the_test_split(monkeypatch):
    """The trainer is handed only training-split ratings: with early stopping, a fold
    carved from them (disjoint from the test split) is its validation set."""
    from svdfill.config import apply_overrides, load_config
    from svdfill.data.dataset import Ratings
    from svdfill.data.split import split

    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(60 * 40, generator=g)[:1500]  # distinct (user, item) pairs
    ratings = Ratings((cells // 40).int(), (cells % 40).int(),
                      torch.randint(1, 6, (1500,), generator=g).float(), 60, 40)
    train, test = split(ratings, fraction=0.1, seed=3)
    test_pairs = set((test.users.long() * 40 + test.items.long()).tolist())
    seen = {}

    import svdfill.train as trainer

    real_fit = trainer.fit

    def spy(cfg, tr, va, *a, **k):
        seen["train"] = set((tr.users.long() * 40 + tr.items.long()).tolist())
        seen["val"] = set((va.users.long() * 40 + va.items.long()).tolist()) if va is not None else set()
        return real_fit(cfg, tr, va, *a, **k)

    monkeypatch.setattr(trainer, "fit", spy)
    cfg = apply_overrides(load_config(None), {"model.factors": 4, "train.epochs": 3, "train.patience": 2,
                                              "train.refit": True, "train.solver": "als"})
    res = ba.run_svdfill(cfg, train, test, 3, 1.0, 5.0)
    assert seen["val"] and not (seen["val"] & test_pairs) and not (seen["train"] & test_pairs)
    assert not (seen["train"] & seen["val"])
    assert res["protocol"].startswith("early stop on a 10% fold of train, refit")
    cfg0 = apply_overrides(cfg, {"train.patience": 0, "train.refit": False})
    res0 = ba.run_svdfill(cfg0, train, test, 3, 1.0, 5.0)
    assert seen["val"] == set() and len(seen["train"]) == len(train)
    assert res0["protocol"] == "fixed 3 epochs on train" and res0["epochs"] == 3


def test_table_format_and_bad_seeds():
    from svdfill.launch.errors import UserError

    per_seed = {"svdfill (ALS, d=8)": [{"rmse": 0.9, "mae": 0.7, "fit_seconds": 1.0, "vs_surprise": 0.5,
                                         "epochs": 5, "protocol": "fixed 5 epochs on train"},
                                        {"rmse": 0.92, "mae": 0.72, "fit_seconds": 3.0, "vs_surprise": 1.5,
                                         "epochs": 5, "protocol": "fixed 5 epochs on train"}]}
    rows = ba.summarize(per_seed)
    assert rows[0]["rmse"] == pytest.approx(0.91) and rows[0]["rmse_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert rows[0]["vs_surprise"] == pytest.approx(1.0)
    text = ba.format_table(rows, label="x", n=10, seeds=[0, 1], quick=False, why_no_surprise="nope",
                           device="cpu", threads=1)
    assert "0.9100 ± 0.0141" in text and "1.00×" in text and "(Surprise rows skipped: nope)" in text
    with pytest.raises(UserError, match="--seeds"):
        ba._parse_seeds("0,a")
