"""launch.trainer.fit: convergence to the planted noise, determinism, early stopping,
refit, cold rows, every optimizer, resume equivalence, the fused-kernel fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from svdfill.config import Config, apply_overrides
from svdfill.data.dataset import Ratings, load_dataset
from svdfill.data.split import split
from svdfill.launch.trainer import config_differences, fit, localize

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


@pytest.mark.parametrize("opt,lr", [("sgd", 0.02), ("adam", 0.01), ("adagrad", 0.1), ("sparse_adam", 0.01)])
def test_every_optimizer_learns(opt, lr):
    cfg = _cfg(**{"train.optimizer": opt, "train.lr": lr, "train.epochs": 4,
                  "train.weight_decay": 1e-5 if opt == "adam" else 0.0})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    rm = [r["val_rmse"] for r in res.history]
    assert all(math.isfinite(x) for x in rm)
    # better than predicting the global mean
    mu = train.mean()
    base = float(((val.ratings.double() - mu) ** 2).mean().sqrt())
    assert res.summary["val_rmse"] < base - 0.1, (opt, rm, base)


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


def test_fused_kernel_falls_back_to_torch_on_cpu_with_one_warning():
    import svdfill.launch.trainer as trainer

    cfg = _cfg(**{"train.epochs": 2})
    train, val = _data(cfg)
    ref = fit(cfg, train, val, quiet=True)
    trainer._FUSED_WARNED = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fit(apply_overrides(cfg, {"train.kernel": "fused"}), train, val, quiet=True)
        fit(apply_overrides(cfg, {"train.kernel": "fused", "train.epochs": 1}), train, val, quiet=True)
    assert sum("fused" in str(x.message) for x in w) == 1
    assert got.summary["val_rmse"] == ref.summary["val_rmse"]


def test_als_solver_runs_through_the_same_loop():
    pytest.importorskip("svdfill.kernels.als")
    cfg = _cfg(**{"train.solver": "als", "train.epochs": 4, "train.reg_factors": 0.1,
                  "train.reg_bias": 0.1})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    assert res.summary["val_rmse"] < 0.65 and res.summary["optimizer"] is None


def test_gibbs_solver_averages_after_burn_in_and_resumes_exactly(tmp_path):
    cfg = _cfg(**{"train.solver": "gibbs", "train.epochs": 8, "train.burn_in": 2,
                  "train.reg_factors": 0.1, "train.reg_bias": 0.1, "train.checkpoint_every": 3})
    train, val = _data(cfg)
    full = fit(cfg, train, val, None, tmp_path / "a", quiet=True)
    assert [r["samples"] for r in full.history] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert all(0.3 < r["noise_sigma"] < 0.8 for r in full.history)
    # averaging draws improves on the single draws of the burn-in
    assert full.history[-1]["val_rmse"] < full.history[1]["val_rmse"]
    assert full.summary["val_rmse"] < 0.5 * 1.1 and full.summary["solver"] == "gibbs"
    assert full.state["user_factors"].shape == (600, 4)
    # stopped at its epoch-3 checkpoint, then resumed: the same chain, the same numbers
    fit(apply_overrides(cfg, {"train.epochs": 3}), train, val, None, tmp_path / "b", quiet=True)
    resumed = fit(cfg, train, val, None, tmp_path / "b", resume=True, quiet=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for k in full.state:
        assert torch.equal(resumed.state[k], full.state[k]), k


def test_gibbs_refit():
    cfg = _cfg(**{"train.solver": "gibbs", "train.epochs": 4, "train.burn_in": 1,
                  "train.patience": 2, "train.refit": True})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    assert res.summary["refit"]["epochs"] == res.summary["best_epoch"]
    assert [r["phase"] for r in res.history].count("refit") == res.summary["best_epoch"]


def test_localize_and_config_differences():
    r = Ratings(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32),
                torch.tensor([1.0, 2.0, 3.0]), 3, 5)
    assert localize(r, 0, 5) is r
    loc = localize(r, 3, 5)
    assert loc.items.tolist() == [0, 1] and loc.users.tolist() == [1, 2] and loc.n_items == 2
    from svdfill.config import to_dict

    a = to_dict(Config())
    b = to_dict(apply_overrides(Config(), {"train.epochs": 3, "train.lr": 0.5, "fill.k": 3}))
    assert config_differences(a, b) == ["train.lr"]


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
