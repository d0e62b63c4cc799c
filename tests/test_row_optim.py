"""kernels.row_optim: the lazy-Adam step without autograd against a float64 reference and
against the autograd path it replaces (BiasedMF loss + RowSparseAdam = torch SparseAdam);
Adagrad against torch.optim.Adagrad; RowSparseAdam's state helpers; the trainer's
fused/direct path on CPU equals the torch path.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from reference import adagrad_reference, lazy_adam_reference as reference
from svdfill.kernels.model import BiasedMF
from svdfill.kernels.sgd import RowSparseAdam
from svdfill.kernels.row_optim import (
    RowSide,
    accumulate_gradients,
    adagrad_lr,
    apply_adagrad,
    apply_adam,
    model_sides,
    step_size,
)

HP = dict(reg_factors=0.03, reg_bias=0.01)
BETAS = (0.9, 0.999)
EPS = 1e-8
ATOL_VS_FLOAT64 = 5e-5
"""Adam divides each coordinate by its own RMS, so where a coordinate's gradient sum is small
its float32 rounding moves the step by up to ~1e-3·lr (measured 9e-6 at lr 0.03 for the torch
twin and the fused kernels alike); elsewhere the agreement is ~1e-7."""


def batches(U, I, n, steps, seed, *, hot=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        users = torch.randint(0, U, (n,), generator=g)
        items = torch.randint(0, I, (n,), generator=g)
        if hot:  # a few rows repeated many times in one batch, and rows left untouched
            users = users % max(1, U // 3)
            items[: n // 2] = 1
        ratings = torch.randint(1, 6, (n,), generator=g).float()
        out.append((users, items, ratings))
    return out


def model(U=13, I=9, d=5, seed=0):
    return BiasedMF(U, I, d, init_std=0.3, global_mean=3.2, seed=seed)


@pytest.mark.parametrize("hot", [False, True])
def test_steps_equal_the_float64_definition(hot):
    data = batches(13, 9, 40, 6, seed=1, hot=hot)
    m = model()
    ref = reference(m, data, lr=0.05, scale=1 / 40, **HP)
    opt = RowSparseAdam(list(m.parameters()), lr=0.05)
    users_side, items_side = model_sides(m, opt)
    for u, i, r in data:
        accumulate_gradients(users_side, items_side, 3.2, u, i, r, scale=1 / 40, **HP)
        step = opt.advance()
        for side in (users_side, items_side):
            apply_adam(side, lr=0.05, step=step)
    for k, want in ref.items():
        torch.testing.assert_close(getattr(m, k).detach().double(), want, rtol=1e-5,
                                   atol=ATOL_VS_FLOAT64, msg=k)
    # the scratch is clean between steps
    for side in (users_side, items_side):
        assert not side.factors_grad.any() and not side.bias_grad.any() and not side.touched.any()


def test_equals_autograd_and_row_sparse_adam():
    """What the trainer did before: sparse autograd of the scaled loss + RowSparseAdam
    (checked against torch.optim.SparseAdam in test_sgd)."""
    data = batches(13, 9, 50, 5, seed=2, hot=True)
    a, b = model(seed=3), model(seed=3)
    a.sparse = True
    opt_a = RowSparseAdam(list(a.parameters()), lr=0.02)
    opt_b = RowSparseAdam(list(b.parameters()), lr=0.02)
    sides = model_sides(b, opt_b)
    for u, i, r in data:
        opt_a.zero_grad(set_to_none=True)
        pred, pen = a(u, i, reg=(HP["reg_factors"], HP["reg_bias"]))
        (0.5 * (((r - pred) ** 2).sum() + pen) / 25.0).backward()
        opt_a.step()
        accumulate_gradients(*sides, 3.2, u, i, r, scale=1 / 25.0, **HP)
        step = opt_b.advance()
        for side in sides:
            apply_adam(side, lr=0.02, step=step)
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), rtol=1e-5, atol=1e-7, msg=k)
        pa, pb = getattr(a, k), getattr(b, k)
        assert opt_a.state[pa]["step"] == opt_b.state[pb]["step"] == len(data)
        for s in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_b.state[pb][s], opt_a.state[pa][s], rtol=1e-5,
                                       atol=1e-9, msg=f"{k}.{s}")


@pytest.mark.parametrize("lr_decay", [0.0, 0.05])
def test_adagrad_rows_equal_torch_dense_adagrad(lr_decay):
    """Dense torch Adagrad over autograd's gradient of the same loss: untouched rows get a
    zero gradient, which leaves them and their sums alone, so only touched rows differ."""
    data = batches(13, 9, 50, 6, seed=4, hot=True)
    a, b = model(seed=5), model(seed=5)
    opt_a = torch.optim.Adagrad(list(a.parameters()), lr=0.05, lr_decay=lr_decay)
    opt_b = torch.optim.Adagrad(list(b.parameters()), lr=0.05, lr_decay=lr_decay)
    sides = model_sides(b, opt_b)
    for t, (u, i, r) in enumerate(data, start=1):
        opt_a.zero_grad(set_to_none=True)
        pred, pen = a(u, i, reg=(HP["reg_factors"], HP["reg_bias"]))
        (0.5 * (((r - pred) ** 2).sum() + pen) / 25.0).backward()
        opt_a.step()
        accumulate_gradients(*sides, 3.2, u, i, r, scale=1 / 25.0, **HP)
        for p in b.parameters():
            opt_b.state[p]["step"] += 1
        for side in sides:
            apply_adagrad(side, lr=0.05, step=t, lr_decay=lr_decay)
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        pa, pb = getattr(a, k), getattr(b, k)
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=k)
        torch.testing.assert_close(opt_b.state[pb]["sum"], opt_a.state[pa]["sum"], rtol=1e-5,
                                   atol=1e-9, msg=f"{k}.sum")
    # and both equal Adagrad written from its definition in float64 (tests/reference.py)
    want = adagrad_reference(model(seed=5), data, lr=0.05, scale=1 / 25.0, lr_decay=lr_decay, **HP)
    for k, w in want.items():
        torch.testing.assert_close(getattr(b, k).detach().double(), w, rtol=1e-5,
                                   atol=ATOL_VS_FLOAT64, msg=k)
    assert adagrad_lr(0.1, 3, 0.5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="counts from 1"):
        adagrad_lr(0.1, 0)


def test_untouched_rows_keep_parameters_and_moments():
    m = model()
    opt = RowSparseAdam(list(m.parameters()), lr=0.1)
    users_side, items_side = model_sides(m, opt)
    users_side.factors_m.fill_(0.5)
    before = {k: getattr(m, k).detach().clone() for k in ("user_factors", "item_factors")}
    u, i, r = torch.tensor([2, 2, 5]), torch.tensor([0, 3, 3]), torch.tensor([4.0, 1.0, 5.0])
    accumulate_gradients(users_side, items_side, 3.2, u, i, r, scale=1.0, **HP)
    assert users_side.touched.nonzero().squeeze(1).tolist() == [2, 5]
    step = opt.advance()
    for side in (users_side, items_side):
        apply_adam(side, lr=0.1, step=step)
    moved = (m.user_factors.detach() != before["user_factors"]).any(1)
    assert moved.nonzero().squeeze(1).tolist() == [2, 5]
    assert (users_side.factors_m[moved.logical_not()] == 0.5).all()
    assert (m.item_factors.detach() != before["item_factors"]).any(1).nonzero().squeeze(1).tolist() == [0, 3]


def test_state_helpers_and_checks():
    m = model()
    opt = RowSparseAdam(list(m.parameters()), lr=0.1)
    ea, eas = opt.moments(m.user_factors)
    assert ea.shape == m.user_factors.shape and not ea.any() and opt.state[m.user_factors]["step"] == 0
    assert opt.moments(m.user_factors)[0] is ea  # created once
    assert opt.advance() == 1 and opt.advance() == 2
    opt.state[m.user_bias]["step"] = 7
    with pytest.raises(RuntimeError, match="different steps"):
        opt.advance()
    assert step_size(0.1, 1, BETAS) == pytest.approx(0.1 * math.sqrt(0.001) / 0.1)
    with pytest.raises(ValueError, match="counts from 1"):
        step_size(0.1, 0, BETAS)
    with pytest.raises(ValueError, match="bias_m must be"):
        RowSide.of(m.user_factors.data, m.user_bias.data, ea, eas, torch.zeros(3),
                   torch.zeros(13))
    with pytest.raises(TypeError, match="RowSparseAdam or Adagrad"):
        model_sides(m, torch.optim.SGD(list(m.parameters()), lr=0.1))


def _trainer_cfg(**over):
    from svdfill.config import Config, apply_overrides

    base = {"data.synthetic.n_users": 500, "data.synthetic.n_items": 150,
            "data.synthetic.n_ratings": 15_000, "data.synthetic.rank": 4,
            "model.factors": 4, "model.init_std": 0.1, "train.optimizer": "sparse_adam",
            "train.lr": 0.01, "train.reg_factors": 0.02, "train.reg_bias": 0.01,
            "train.batch_size": 512, "train.epochs": 3, "train.patience": 0}
    return apply_overrides(Config(), {**base, **over})


def test_trainer_fused_adagrad_on_cpu_equals_torch_adagrad():
    import warnings as _w

    from svdfill.config import ConfigError, apply_overrides
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit

    cfg = _trainer_cfg(**{"train.optimizer": "adagrad", "train.lr": 0.05})
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    ref = fit(cfg, train, val, quiet=True)
    with _w.catch_warnings():
        _w.simplefilter("ignore", RuntimeWarning)
        got = fit(apply_overrides(cfg, {"train.kernel": "fused"}), train, val, quiet=True)
    for a, b in zip(ref.history, got.history):
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], abs=1e-5)
    assert ref.summary["val_rmse"] < ref.history[0]["val_rmse"]
    with pytest.raises(ConfigError, match="weight_decay = 0"):
        apply_overrides(cfg, {"train.kernel": "fused", "train.weight_decay": 1e-4})
    with pytest.raises(ConfigError, match="not optimizer 'adam'"):
        apply_overrides(cfg, {"train.kernel": "fused", "train.optimizer": "adam"})


def test_trainer_fused_request_on_cpu_and_resume(tmp_path):
    """One process trains sparse_adam through this module; train.kernel = 'fused' on CPU
    says once that it runs the torch twin and gives the same run; a resumed run equals an
    uninterrupted one. (Against DDP + autograd at W = 2: tests/test_world.py.)"""
    from svdfill.kernels import dispatch
    from svdfill.config import apply_overrides
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit

    cfg = _trainer_cfg()
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    ref = fit(cfg, train, val, quiet=True)
    assert ref.summary["val_rmse"] < ref.history[0]["val_rmse"]
    dispatch.reset_warnings()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fit(apply_overrides(cfg, {"train.kernel": "fused"}), train, val, quiet=True)
    assert sum("row step" in str(x.message) for x in w) == 1
    assert got.summary["val_rmse"] == ref.summary["val_rmse"]
    for k in ref.state:
        assert torch.equal(got.state[k], ref.state[k])
    fit(apply_overrides(cfg, {"train.epochs": 2, "train.checkpoint_every": 1}), train, val,
        None, tmp_path, quiet=True)
    resumed = fit(apply_overrides(cfg, {"train.checkpoint_every": 1}), train, val, None,
                  tmp_path, resume=True, quiet=True)
    assert resumed.summary["val_rmse"] == ref.summary["val_rmse"]
    for k in ref.state:
        assert torch.equal(resumed.state[k], ref.state[k])


@pytest.mark.cuda
def test_trainer_fused_kernels_on_cuda_match_the_cpu_run(cuda, monkeypatch):
    """The trainer on CUDA with train.kernel = 'fused' (the Triton kernels, no warning)
    reaches the CPU run's RMSE; float atomics reorder sums, so not bit for bit."""
    from svdfill.config import apply_overrides
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = _trainer_cfg()
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    ref = fit(cfg, train, val, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = fit(apply_overrides(cfg, {"train.kernel": "fused", "train.device": "cuda"}),
                  train, val, quiet=True)
    for a, b in zip(ref.history, got.history):
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], abs=1e-3)
