"""svdfill.train solvers through fit: every optimizer learns, the fused-kernel fallback,
ALS, Gibbs (burn-in, exact resume, refit); make_solver's choice of class."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from svdfill.config import apply_overrides
from svdfill.train import fit
from test_loop import _cfg, _data


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


def test_fused_kernel_falls_back_to_torch_on_cpu_with_one_warning():
    from svdfill.kernels import dispatch

    cfg = _cfg(**{"train.epochs": 2})
    train, val = _data(cfg)
    ref = fit(cfg, train, val, quiet=True)
    dispatch.reset_warnings()
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
    cfg = _cfg(**{"train.solver": "gibbs", "train.epochs": 8, "train.gibbs.burn_in": 2,
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
    cfg = _cfg(**{"train.solver": "gibbs", "train.epochs": 4, "train.gibbs.burn_in": 1,
                  "train.patience": 2, "train.refit": True})
    train, val = _data(cfg)
    res = fit(cfg, train, val, quiet=True)
    assert res.summary["refit"]["epochs"] == res.summary["best_epoch"]
    assert [r["phase"] for r in res.history].count("refit") == res.summary["best_epoch"]


class _World:
    """What the factory reads of a World: size, device, whether DDP syncs users sparsely."""

    def __init__(self, world_size: int, sparse_users: bool = True):
        self.world_size, self.sparse_users = world_size, sparse_users
        self.device = torch.device("cpu")


@pytest.mark.parametrize("over,world,want", [
    ({"train.optimizer": "sparse_adam"}, _World(1), True),
    # W > 1 on gloo with the torch kernel: DDP all-reduces only the touched user rows
    ({"train.optimizer": "sparse_adam"}, _World(2, sparse_users=True), False),
    ({"train.optimizer": "sparse_adam"}, _World(2, sparse_users=False), True),
    ({"train.optimizer": "sparse_adam", "train.kernel": "fused"}, _World(2), True),
    ({"train.optimizer": "adagrad"}, _World(1), False),
    ({"train.optimizer": "adagrad", "train.kernel": "fused"}, _World(1), True),
    ({"train.optimizer": "adam"}, _World(1), False),
    ({"train.optimizer": "sgd"}, _World(1), False),
    ({"train.solver": "als", "train.optimizer": "sparse_adam"}, _World(1), False),
])
def test_row_sparse_selection_rules(over, world, want):
    from svdfill.train.factory import row_sparse_without_autograd

    assert row_sparse_without_autograd(_cfg(**over), world) is want


@pytest.mark.parametrize("over,cls,name", [
    ({"train.optimizer": "sgd"}, "FunkSGD", "sgd"),
    ({"train.optimizer": "adam"}, "AutogradSolver", "adam"),
    ({"train.optimizer": "adagrad"}, "AutogradSolver", "adagrad"),
    ({"train.optimizer": "adagrad", "train.kernel": "fused"}, "RowSparseSolver", "adagrad"),
    ({"train.optimizer": "sparse_adam"}, "RowSparseSolver", "sparse_adam"),
    ({"train.solver": "als"}, "ALSSolver", "als"),
    ({"train.solver": "gibbs"}, "GibbsSolver", "gibbs"),
])
def test_make_solver_picks_one_class_per_method(over, cls, name):
    from svdfill.distributed.world import World
    from svdfill.kernels import dispatch
    from svdfill.train import make_solver
    from svdfill.train.shard import TrainShard

    cfg = _cfg(**over)
    train, _ = _data(cfg)
    world = World()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused on CPU: the torch twin, warned about elsewhere
        solver = make_solver(cfg, world, TrainShard.build(world, train, train.n_items, 0, train.n_items))
    assert type(solver).__name__ == cls and solver.name == name
    if cfg.train.kernel == "fused":  # on this CPU: the torch twin of the row step
        from svdfill.kernels.row_optim import accumulate_gradients

        assert solver.ops.accumulate is accumulate_gradients
    dispatch.reset_warnings()
