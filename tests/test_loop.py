"""svdfill.train.loop.fit: convergence to the planted noise, determinism, early stopping,
refit, cold rows, resume equivalence, the train-metrics sample. (Each method:
test_solvers.py; the run directory: test_run_dir.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from svdfill.config import Config, apply_overrides
from svdfill.data.dataset import Ratings, load_dataset
from svdfill.data.split import split
from svdfill.train import fit

SMALL = {"data.synthetic.n_users": 600, "data.synthetic.n_items": 200,
         "data.synthetic.n_ratings": 20_000, "data.synthetic.rank": 4,
         "data.synthetic.noise": 0.5, "model.factors": 4, "model.init_std": 0.1,
         "train.lr": 0.02, "train.reg_factors": 0.02, "train.reg_bias": 0.01,
         "train.batch_size": 256, "train.epochs": 6, "train.patience": 0}


def _cfg(**over):
    return apply_overrides(Config(), {**SMALL, **over})


_DATA = {}


def _data(cfg):
    key = repr(cfg.data)
    if key not in _DATA:
        ratings, _ = load_dataset(cfg.data)
        _DATA[key] = split(ratings, fraction=0.1, seed=0)
    return _DATA[key]


def test_planted_model_reaches_the_noise_floor():
    # ~100 ratings per user and ~330 per item: the estimation error of rank-4 rows is small
    cfg = _cfg(**{"data.synthetic.n_users": 1000, "data.synthetic.n_items": 300,
                  "data.synthetic.n_ratings": 100_000, "data.synthetic.rank": 4,
                  "model.factors": 4, "train.epochs": 30, "train.patience": 3,
                  "train.lr": 0.02, "train.batch_size": 128})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    sigma = cfg.data.synthetic.noise
    assert res.summary["val_rmse"] < 1.08 * sigma, res.summary  # measured 1.045σ
    # the model beats the bias-only baseline by far
    assert res.history[0]["val_rmse"] > res.summary["val_rmse"]


def test_cpu_training_is_deterministic_to_the_last_digit():
    cfg = _cfg(**{"train.epochs": 3})
    train, val = _data(cfg)
    a = fit(cfg, train, val, quiet=True)
    b = fit(cfg, train, val, quiet=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])
    c = fit(apply_overrides(cfg, {"train.seed": 1}), train, val, quiet=True)
    assert strip(c.history) != strip(a.history)


def test_early_stopping_restores_the_best_weights():
    # big factors, no regularization, large steps: validation RMSE turns up quickly
    cfg = _cfg(**{"model.factors": 32, "train.reg_factors": 0.0, "train.reg_bias": 0.0,
                  "train.lr": 0.05, "train.epochs": 40, "train.patience": 2})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    s = res.summary
    assert s["stopped_early"] and s["epochs_run"] == s["best_epoch"] + 2
    best_row = res.history[s["best_epoch"] - 1]
    assert best_row["val_rmse"] == s["val_rmse"] == min(r["val_rmse"] for r in res.history)
    # the returned weights are the best epoch's
    from svdfill.kernels.metrics import rating_metrics
    from svdfill.kernels.model import BiasedMF

    m = BiasedMF.from_state(res.state)
    got = rating_metrics(m.predict(val.users, val.items), val.ratings)["rmse"]
    assert got == pytest.approx(s["val_rmse"], abs=1e-6)


def test_refit_trains_on_train_plus_validation_for_the_best_epoch_count():
    cfg = _cfg(**{"train.epochs": 5, "train.patience": 2, "train.refit": True,
                  "model.factors": 16, "train.reg_factors": 0.0, "train.lr": 0.05})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    s = res.summary
    assert s["refit"]["epochs"] == s["best_epoch"]
    assert s["refit"]["n_train"] == len(train) + len(val)
    phases = [r["phase"] for r in res.history]
    assert phases.count("refit") == s["best_epoch"] and phases[0] == "select"
    assert s["refit"]["global_mean"] == pytest.approx(train.cat(val).mean(), rel=1e-6)
    # the refit model fits the validation pairs it now trains on better than the selected one
    from svdfill.kernels.metrics import rating_metrics
    from svdfill.kernels.model import BiasedMF

    fitted = rating_metrics(BiasedMF.from_state(res.state).predict(val.users, val.items), val.ratings)
    assert fitted["rmse"] < s["val_rmse"]


def test_rows_without_training_ratings_stay_at_zero_and_predict_from_biases():
    g = torch.Generator().manual_seed(0)
    n = 3000
    users = torch.randint(0, 50, (n,), generator=g, dtype=torch.int32)
    items = torch.randint(0, 40, (n,), generator=g, dtype=torch.int32)
    ratings = (torch.rand(n, generator=g) * 4 + 1).float()
    train = Ratings(users, items, ratings, 52, 41)  # user 50, 51 and item 40 never rated
    val = Ratings(torch.tensor([50, 3], dtype=torch.int32), torch.tensor([5, 40], dtype=torch.int32),
                  torch.tensor([3.0, 4.0]), 52, 41)
    cfg = _cfg(**{"train.epochs": 3, "model.factors": 4, "train.optimizer": "adam",
                  "train.weight_decay": 1e-4})
    res = fit(cfg, train, val, quiet=True)
    st = res.state
    assert torch.all(st["user_factors"][50:] == 0) and torch.all(st["item_factors"][40] == 0)
    assert torch.all(st["user_bias"][50:] == 0) and st["item_bias"][40] == 0
    assert res.summary["n_val_cold"] == 2 and res.summary["n_val_cold_users"] == 1
    assert res.summary["n_val_cold_items"] == 1 and math.isfinite(res.summary["val_rmse"])


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    cfg = _cfg(**{"train.epochs": 5, "train.optimizer": "adam", "train.lr": 0.01,
                  "train.lr_decay": 0.9, "train.patience": 3})
    train, val = _data(cfg)
    full = fit(cfg, train, val, None, tmp_path / "a", quiet=True)
    # stop after epoch 2 (its checkpoint), then resume with the full epoch budget
    fit(apply_overrides(cfg, {"train.epochs": 2}), train, val, None, tmp_path / "b", quiet=True)
    resumed = fit(cfg, train, val, None, tmp_path / "b", resume=True, quiet=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for k in full.state:
        assert torch.equal(resumed.state[k], full.state[k])
    a = {k: v for k, v in full.summary.items() if k != "train_seconds"}
    b = {k: v for k, v in resumed.summary.items() if k != "train_seconds"}
    assert a == b


def test_train_metrics_on_a_fixed_sample():
    """Each epoch's train_* metrics come from a fixed seeded sample of metrics_sample
    ratings when there are more: close to, but not, the full figures (which metrics_sample
    = 0 gives, as does the summary either way); the validation figures and the model do
    not depend on it."""
    from svdfill.kernels.metrics import rating_metrics
    from svdfill.kernels.model import BiasedMF

    cfg = _cfg(**{"train.epochs": 3, "train.solver": "als"})
    train, val = _data(cfg)
    full = fit(apply_overrides(cfg, {"train.metrics_sample": 0}), train, val, quiet=True)
    part = fit(apply_overrides(cfg, {"train.metrics_sample": 3000}), train, val, quiet=True)
    assert len(train) > 3000
    for a, b in zip(full.history, part.history, strict=True):
        assert a["val_rmse"] == b["val_rmse"]
        assert a["train_rmse"] != b["train_rmse"]
        assert abs(a["train_rmse"] - b["train_rmse"]) < 0.05 * a["train_rmse"], (a, b)
    m = BiasedMF.from_state(part.state)
    want = rating_metrics(m.predict(train.users, train.items), train.ratings)["rmse"]
    assert part.summary["train_rmse"] == pytest.approx(want, rel=1e-6)
    assert full.summary["train_rmse"] == pytest.approx(want, rel=1e-6)
    # the sample is the same at every run of the config: same figures twice
    again = fit(apply_overrides(cfg, {"train.metrics_sample": 3000}), train, val, quiet=True)
    assert [r["train_rmse"] for r in again.history] == [r["train_rmse"] for r in part.history]
