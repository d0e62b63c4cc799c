"""distributed.dsgd + train.dsgd: the DSGD schedule on a real gloo ring (W = 2, 3, ragged
blocks, an empty block, an item nobody rated) equals a float64 one-process simulation of the
same schedule; W = 1 is the one-process Funk SGD bit for bit; on ML-100K W = 2 reaches the
one-process validation RMSE. Adagrad: W = 1 is the one-process row-sparse Adagrad bit for
bit, W = 2 the float64 schedule with the item blocks' sums travelling (bytes, checkpoint
resume at W = 2 and re-blocked to W = 1), and it trains as W = 1 on low-rank data; adam is
refused."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from multiprocess_harness import run_ranks
from reference import sgd_step_reference
from svdfill.config import Config
from svdfill.data.dataset import Ratings
from svdfill.distributed.dsgd import block_seed, bucket_by_item_block
from svdfill.distributed.world import DistWorld, World
from svdfill.kernels.dispatch import training_ops
from svdfill.kernels.model import init_rows
from svdfill.train.dsgd import DSGDSolver

U, I, N = 37, 23, 700
BOUNDS = {1: ([(0, U)], [(0, I)]),
          2: ([(0, 20), (20, U)], [(0, 7), (7, I)]),
          3: ([(0, 5), (5, 30), (30, U)], [(0, 10), (10, 11), (11, I)])}


@dataclass
class Shard:
    """What DSGDSolver reads of distributed.grid.GridShard, cut here from full tensors."""

    layout: SimpleNamespace
    rank: int
    size: int
    by_user: tuple
    val_by_user: tuple | None


def grid_shard(rank, W, train, val, user_bounds, item_bounds, n_users, n_items) -> Shard:
    lo, hi = user_bounds[rank]

    def mine(t):
        u, i, r = t
        m = (u >= lo) & (u < hi)
        return u[m].long(), i[m].long(), r[m]

    layout = SimpleNamespace(user_bounds=user_bounds, item_bounds=item_bounds,
                             n_users=n_users, n_items=n_items)
    return Shard(layout, rank, W, mine(train), mine(val) if val is not None else None)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, U, (N,), generator=g)
    i = torch.randint(0, I - 1, (N,), generator=g)  # item I-1 is never rated
    r = torch.randint(1, 6, (N,), generator=g).float()
    return (u, i, r), (u[:80], i[:80], r[:80])


def cfg(epochs=2, factors=4, batch=16) -> Config:
    c = Config()
    c.model.factors, c.model.init_std = factors, 0.1
    t = c.train
    t.lr, t.lr_decay, t.reg_factors, t.reg_bias, t.weight_decay = 0.05, 0.9, 0.03, 0.01, 0.002
    t.batch_size, t.epochs, t.seed = batch, epochs, 3
    return c


def simulate(W, train, c, epochs):
    """The DSGD schedule in float64, one process, full tables and GLOBAL ids."""
    ub, ib = BOUNDS[W]
    t = c.train
    d = c.model.factors
    P = init_rows(0, U, d, std=c.model.init_std, seed=t.seed, table=1).double()
    Q = init_rows(0, I, d, std=c.model.init_std, seed=t.seed, table=2).double()
    u, i, r = train
    P[torch.bincount(u, minlength=U) == 0] = 0
    Q[torch.bincount(i, minlength=I) == 0] = 0
    bu, bi = torch.zeros(U, dtype=torch.float64), torch.zeros(I, dtype=torch.float64)
    mu = float(torch.tensor(float(r.double().sum()) / len(r), dtype=torch.float32))
    for epoch in range(1, epochs + 1):
        lr = t.lr * t.lr_decay ** (epoch - 1)
        for s in range(W):
            for rank in range(W):
                j = (rank + s) % W
                m = ((u >= ub[rank][0]) & (u < ub[rank][1]) & (i >= ib[j][0]) & (i < ib[j][1]))
                bu_, bi_, br_ = u[m], i[m], r[m]
                n = len(br_)
                if not n:
                    continue
                steps = max(1, math.ceil(n / t.batch_size))
                g = torch.Generator().manual_seed(block_seed(t.seed, "select", epoch, rank, j, W))
                perm = torch.randperm(n, generator=g)
                cuts = [(k * n) // steps for k in range(steps + 1)]
                for k in range(steps):
                    idx = perm[cuts[k]:cuts[k + 1]]
                    P, Q, bu, bi = sgd_step_reference(
                        P, Q, bu, bi, mu, bu_[idx], bi_[idx], br_[idx], lr=lr,
                        reg_factors=t.reg_factors + t.weight_decay,
                        reg_bias=t.reg_bias + t.weight_decay)
    return P, Q, bu, bi


def _train_rank(rank, W, epochs):
    train, val = data()
    world = DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World()
    ub, ib = BOUNDS[W]
    s = DSGDSolver(cfg(epochs), world, grid_shard(rank, W, train, val, ub, ib, U, I),
                   training_ops("sgd", "cpu"))
    for e in range(1, epochs + 1):
        s.run_epoch("select", e, False)
    vm = s.evaluate("val")
    st = {k: v.numpy().copy() for k, v in s.local_state().items()}
    return st, vm, s._last_sweep[0], s.ring.bytes_sent


def test_bucket_by_item_block_cuts_and_localizes():
    (u, i, r), _ = data(1)
    ub, ib = BOUNDS[3]
    m = (u >= 5) & (u < 30)
    blocks = bucket_by_item_block(u[m], i[m], r[m], ib, 5)
    assert sum(len(b[0]) for b in blocks) == int(m.sum())
    for j, (bu, bi, br) in enumerate(blocks):
        lo, hi = ib[j]
        want = m & (i >= lo) & (i < hi)
        assert torch.equal(bu, u[want] - 5) and torch.equal(bi, i[want] - lo)
        assert torch.equal(br, r[want])


def check_against_simulation(W, results, epochs=2):
    P, Q, bu, bi = simulate(W, data()[0], cfg(epochs), epochs)
    ub, ib = BOUNDS[W]
    for rank, (st, _, _, _) in enumerate(results):
        (ulo, uhi), (ilo, ihi) = ub[rank], ib[rank]
        for name, want in (("user_factors", P[ulo:uhi]), ("user_bias", bu[ulo:uhi]),
                           ("item_factors", Q[ilo:ihi]), ("item_bias", bi[ilo:ihi])):
            np.testing.assert_allclose(st[name], want.numpy(), atol=2e-5, err_msg=name)
    rmse = {round(res[1]["rmse"], 6) for res in results}
    assert len(rmse) == 1  # every rank reports the world's figure


def test_one_process_matches_simulation_and_funk_sgd():
    from svdfill.train.funk_sgd import FunkSGD
    from svdfill.train.shard import TrainShard

    res = _train_rank(0, 1, 2)
    check_against_simulation(1, [res])
    # the plain one-process recipe, bit for bit
    (u, i, r), _ = data()
    c = cfg(2)
    shard = TrainShard.build(World(), Ratings(u.int(), i.int(), r, U, I), I, 0, I)
    f = FunkSGD(c, World(), shard, training_ops("sgd", "cpu"))
    for e in (1, 2):
        f.run_epoch("select", e, False)
    st = res[0]
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        assert torch.equal(torch.from_numpy(st[k]), getattr(f.model, k).detach()), k


@pytest.mark.multiprocess
@pytest.mark.parametrize("W", [2, 3])
def test_ring_schedule_matches_simulation(W):
    results = run_ranks(_train_rank, W, 2)
    check_against_simulation(W, results)
    for rank, (st, _, epoch_bytes, total) in enumerate(results):
        # one epoch sends each visiting item block once: the W blocks' Q rows and b_i
        d = st["item_factors"].shape[1]
        assert epoch_bytes == sum((hi - lo) * (d + 1) * 4 for lo, hi in BOUNDS[W][1])
        # two epochs + one evaluation, each one round of the ring
        assert total == 3 * epoch_bytes


def _ml100k_rank(rank, W, path, epochs):
    from svdfill.config import load_config
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split

    c = load_config("configs/ml-100k-sgd.toml")
    c.data.path = str(path)
    # smaller and coarser than the recipe: a fast test (the full check is on ML-1M)
    c.model.factors, c.train.batch_size = 32, 512
    ratings, _ = load_dataset(c.data)
    tr, va = split(ratings, how="random", fraction=0.1, seed=0)
    U_, I_ = ratings.n_users, ratings.n_items
    ub = [((q * U_) // W, ((q + 1) * U_) // W) for q in range(W)]
    ib = [((q * I_) // W, ((q + 1) * I_) // W) for q in range(W)]
    world = DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World()
    shard = grid_shard(rank, W, (tr.users.long(), tr.items.long(), tr.ratings),
                       (va.users.long(), va.items.long(), va.ratings), ub, ib, U_, I_)
    s = DSGDSolver(c, world, shard, training_ops("sgd", "cpu"))
    out = []
    for e in range(1, epochs + 1):
        s.run_epoch("select", e, False)
        out.append(s.evaluate("val")["rmse"])
    return out


@pytest.mark.multiprocess
def test_ml100k_two_ranks_reach_one_process_rmse(ml100k_path):
    epochs = 5
    one = _ml100k_rank(0, 1, ml100k_path, epochs)
    two = run_ranks(_ml100k_rank, 2, ml100k_path, epochs, timeout=240)[0]
    assert one[-1] < one[0]  # it learns
    assert abs(two[-1] - one[-1]) < 0.01, (one, two)


# -- optimizer = "adagrad": the item blocks' Adagrad sums travel with them -------------------

SUMS = ("user_factors_sum", "user_bias_sum", "item_factors_sum", "item_bias_sum")


def adagrad_cfg(epochs=2, factors=4, batch=16) -> Config:
    c = cfg(epochs, factors, batch)
    c.train.optimizer, c.train.weight_decay = "adagrad", 0.0
    return c


def simulate_adagrad(Ws, train, c, state=None):
    """The DSGD Adagrad schedule in float64, one process, full tables and GLOBAL ids; epoch
    e (1-based) runs at W = ``Ws[e - 1]`` (0 = skipped: it starts from ``state``, the dict
    of full tables and sums a W run left)."""
    from reference import _row_gradients

    t = c.train
    d = c.model.factors
    u, i, r = train
    if state is None:
        P = init_rows(0, U, d, std=c.model.init_std, seed=t.seed, table=1).double()
        Q = init_rows(0, I, d, std=c.model.init_std, seed=t.seed, table=2).double()
        P[torch.bincount(u, minlength=U) == 0] = 0
        Q[torch.bincount(i, minlength=I) == 0] = 0
        w = {"user_factors": P, "item_factors": Q, "user_bias": torch.zeros(U, dtype=torch.float64),
             "item_bias": torch.zeros(I, dtype=torch.float64)}
        acc = {k: torch.zeros_like(v) for k, v in w.items()}
    else:
        w = {k: torch.as_tensor(state[k]).double().clone() for k in
             ("user_factors", "item_factors", "user_bias", "item_bias")}
        acc = {k: torch.as_tensor(state[k + "_sum"]).double().clone() for k in w}
    mu = float(torch.tensor(float(r.double().sum()) / len(r), dtype=torch.float32))
    for epoch, W in enumerate(Ws, start=1):
        if not W:
            continue
        ub, ib = BOUNDS[W]
        lr = t.lr * t.lr_decay ** (epoch - 1)
        for s in range(W):
            for rank in range(W):
                j = (rank + s) % W
                m = ((u >= ub[rank][0]) & (u < ub[rank][1]) & (i >= ib[j][0]) & (i < ib[j][1]))
                bu_, bi_, br_ = u[m], i[m], r[m]
                n = len(br_)
                if not n:
                    continue
                steps = max(1, math.ceil(n / t.batch_size))
                g = torch.Generator().manual_seed(block_seed(t.seed, "select", epoch, rank, j, W))
                perm = torch.randperm(n, generator=g)
                cuts = [(k * n) // steps for k in range(steps + 1)]
                for k in range(steps):
                    idx = perm[cuts[k]:cuts[k + 1]]
                    grads = _row_gradients(w, mu, bu_[idx], bi_[idx], br_[idx],
                                           1.0 / max(n / steps, 1.0), t.reg_factors, t.reg_bias)
                    for key, (gr, _) in grads.items():
                        acc[key] += gr * gr
                        w[key] -= lr * gr / (acc[key].sqrt() + 1e-10)
    return {**w, **{k + "_sum": v for k, v in acc.items()}}


def _adagrad_solver(rank, W, epochs=2):
    train, val = data()
    world = DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World()
    ub, ib = BOUNDS[W]
    return DSGDSolver(adagrad_cfg(epochs), world, grid_shard(rank, W, train, val, ub, ib, U, I))


def _adagrad_rank(rank, W, epochs, ckdir=None):
    """Train ``epochs``; with ``ckdir``, also: 1 epoch, checkpoint, a fresh solver resumes
    from the files and trains the rest (the resumed state is returned too)."""
    from svdfill.distributed import grid_checkpoint as gck
    from svdfill.distributed.grid import GridLayout

    s = _adagrad_solver(rank, W, epochs)
    for e in range(1, epochs + 1):
        s.run_epoch("select", e, False)
    vm = s.evaluate("val")
    st = {k: v.numpy().copy() for k, v in s.local_state().items()}
    out = {"state": st, "val": vm, "epoch_sent": s._last_sweep[0],
           "epoch_received": s._last_sweep[1], "total_sent": s.ring.bytes_sent,
           "bytes": dict(s.bytes), "tensor_bytes": s.tensor_bytes()}
    if ckdir is not None:
        ub, ib = BOUNDS[W]
        lay = GridLayout(U, I, ub, ib)
        a = _adagrad_solver(rank, W, epochs)
        a.run_epoch("select", 1, False)
        gck.save_grid_model(ckdir, "state-e000001", lay, rank, a.local_state(), world=a.world,
                            meta={"factors": a.d})
        b = _adagrad_solver(rank, W, epochs)
        b.load_blocks({**gck.load_grid_block(ckdir, "state-e000001", lay, rank),
                       **gck.load_grid_extra(ckdir, "state-e000001")})
        for e in range(2, epochs + 1):
            b.run_epoch("select", e, False)
        out["resumed"] = {k: v.numpy().copy() for k, v in b.local_state().items()}
    return out


def check_adagrad(W, results, want, atol=1e-5):
    ub, ib = BOUNDS[W]
    for rank, res in enumerate(results):
        st = res["state"]
        assert set(st) == {"user_factors", "user_bias", "item_factors", "item_bias", *SUMS}
        (ulo, uhi), (ilo, ihi) = ub[rank], ib[rank]
        for name in st:
            lo, hi = (ulo, uhi) if name.startswith("user") else (ilo, ihi)
            np.testing.assert_allclose(st[name], want[name][lo:hi].numpy(), atol=atol,
                                       rtol=1e-5, err_msg=name)
    assert len({round(res["val"]["rmse"], 6) for res in results}) == 1


def test_adagrad_one_process_is_row_sparse_adagrad_bit_for_bit():
    """W = 1 DSGD Adagrad = RowSparseSolver (the one-process row-sparse Adagrad: same init,
    shuffle, steps, sums) bit for bit, = the float64 schedule, and ≈ autograd + Adagrad."""
    from svdfill.kernels.model import PARAMS
    from svdfill.train.autograd_optim import AutogradSolver
    from svdfill.train.row_sparse import RowSparseSolver
    from svdfill.train.shard import TrainShard

    res = _adagrad_rank(0, 1, 2)
    check_adagrad(1, [res], simulate_adagrad([1, 1], data()[0], adagrad_cfg()))
    (u, i, r), _ = data()
    c = adagrad_cfg(2)
    shard = TrainShard.build(World(), Ratings(u.int(), i.int(), r, U, I), I, 0, I)
    one = RowSparseSolver(c, World(), shard, "adagrad", training_ops("adagrad", "cpu"))
    auto = AutogradSolver(c, World(), shard, "adagrad")
    for e in (1, 2):
        one.run_epoch("select", e, False)
        auto.run_epoch("select", e, False)
    st = res["state"]
    for k in PARAMS:
        got = torch.from_numpy(st[k])
        assert torch.equal(got, getattr(one.model, k).detach()), k
        assert torch.equal(torch.from_numpy(st[k + "_sum"]),
                           one.opt.state[getattr(one.model, k)]["sum"]), k
        torch.testing.assert_close(got, getattr(auto.model, k).detach(), atol=1e-5, rtol=1e-5)
    # bytes: nothing travels at W = 1; the tables held are the model's and the sums
    assert res["total_sent"] == 0 and res["epoch_received"] == 0
    assert res["tensor_bytes"] == 2 * 4 * (U * 5 + I * 5)


def test_adagrad_checkpoint_resume_continues_exactly(tmp_path):
    """W = 1: one epoch, a grid checkpoint (the sums are user_* / item_* block rows), a
    fresh solver loaded from the files trains epoch 2 = the uninterrupted 2 epochs, bit for
    bit. A state without the sums (an sgd run's) is refused."""
    from svdfill.distributed import grid_checkpoint as gck

    res = _adagrad_rank(0, 1, 2, tmp_path)
    for k, v in res["state"].items():
        assert np.array_equal(res["resumed"][k], v), k
    saved = gck.load_grid_rows(tmp_path, "state-e000001", "item", 0, I)
    assert set(saved) == {"item_factors", "item_bias", "item_factors_sum", "item_bias_sum"}
    s = _adagrad_solver(0, 1)
    model_only = {k: v for k, v in s.local_state().items() if k in gck.MODEL_KEYS}
    with pytest.raises(ValueError, match="user_factors_sum"):
        s.load_blocks(model_only)


@pytest.mark.multiprocess
def test_adagrad_ring_w2_matches_schedule_bytes_and_resumes(tmp_path):
    """W = 2 (gloo): the float64 schedule; the ring carries Q, b_i and their sums (2× the
    Funk SGD payload per epoch, evaluations only the model rows); a checkpoint after epoch
    1 resumed at W = 2 continues exactly, and re-blocked to W = 1 it continues as the
    schedule (epoch 1 at W = 2, epoch 2 at W = 1)."""
    from svdfill.distributed import grid_checkpoint as gck

    W, d = 2, 4
    results = run_ranks(_adagrad_rank, W, 2, tmp_path)
    check_adagrad(W, results, simulate_adagrad([2, 2], data()[0], adagrad_cfg()))
    model_epoch = sum((hi - lo) * (d + 1) * 4 for lo, hi in BOUNDS[W][1])
    from svdfill.plan.estimate import Problem, estimate
    from svdfill.plan.profile import cpu_profile

    plan = estimate(Problem(U, I, N, d, W, solver="sgd", optimizer="adagrad"),
                    cpu_profile(cores=2, memory_bytes=2**30), "grid")
    assert plan.sweep_bytes == 2 * model_epoch  # the planner's ring bytes, exactly
    for res in results:
        assert res["epoch_sent"] == res["epoch_received"] == 2 * model_epoch
        assert res["bytes"]["sweep_sent"] == 2 * 2 * model_epoch
        # two epochs with the sums, one evaluation without
        assert res["total_sent"] == 2 * 2 * model_epoch + model_epoch
        assert res["bytes"]["eval_sent"] == model_epoch
        for k, v in res["state"].items():
            assert np.array_equal(res["resumed"][k], v), k
    # the W = 2 checkpoint read at W = 1: every table re-blocked (sums included) …
    full = {**gck.load_grid_rows(tmp_path, "state-e000001", "user", 0, U),
            **gck.load_grid_rows(tmp_path, "state-e000001", "item", 0, I)}
    assert set(full) == {"user_factors", "user_bias", "item_factors", "item_bias", *SUMS}
    s = _adagrad_solver(0, 1)
    s.load_blocks(full)
    s.run_epoch("select", 2, False)
    after1 = simulate_adagrad([2], data()[0], adagrad_cfg())
    for k in full:
        np.testing.assert_allclose(full[k].numpy(), after1[k].numpy(), atol=1e-5, rtol=1e-5)
    # … and continues at W = 1 as the schedule does
    check_adagrad(1, [{"state": {k: v.numpy() for k, v in s.local_state().items()},
                       "val": {"rmse": 0.0}}],
                  simulate_adagrad([0, 1], data()[0], adagrad_cfg(), state=after1))


def _lowrank(seed=5, U_=400, I_=300, n=24_000, rank=3):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(U_, rank, generator=g), torch.randn(I_, rank, generator=g)
    key = torch.randperm(U_ * I_, generator=g)[:n]
    u, i = key // I_, key % I_
    r = (3.5 + 0.6 * (a[u] * b[i]).sum(1) + 0.3 * torch.randn(n, generator=g)).clamp(1, 5)
    cut = n * 9 // 10
    return U_, I_, (u[:cut], i[:cut], r[:cut]), (u[cut:], i[cut:], r[cut:])


def _lowrank_rank(rank, W, epochs):
    U_, I_, train, val = _lowrank()
    ub = [((q * U_) // W, ((q + 1) * U_) // W) for q in range(W)]
    ib = [((q * I_) // W, ((q + 1) * I_) // W) for q in range(W)]
    c = adagrad_cfg(epochs, factors=8, batch=256)
    c.train.lr, c.train.lr_decay, c.train.reg_factors, c.train.reg_bias = 0.1, 0.95, 0.05, 0.01
    world = DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World()
    s = DSGDSolver(c, world, grid_shard(rank, W, train, val, ub, ib, U_, I_))
    out = [s.evaluate("val")["rmse"]]
    for e in range(1, epochs + 1):
        s.run_epoch("select", e, False)
        out.append(s.evaluate("val")["rmse"])
    return out


@pytest.mark.multiprocess
def test_adagrad_two_ranks_train_as_one_process():
    """Low-rank synthetic ratings: W = 2 DSGD Adagrad learns (validation RMSE well below
    the start) and ends within 0.01 of W = 1 (the schedules differ by the stratification)."""
    epochs = 10
    one = _lowrank_rank(0, 1, epochs)
    two = run_ranks(_lowrank_rank, 2, epochs)[0]
    assert one[-1] < 0.8 * one[0] and two[-1] < 0.8 * two[0], (one, two)
    assert abs(two[-1] - one[-1]) < 0.01, (one, two)


@pytest.mark.parametrize("opt", ["adam", "sparse_adam"])
def test_grid_refuses_adam_and_names_what_runs(opt):
    from svdfill.errors import UserError

    c = cfg()
    c.train.optimizer = opt
    train, val = data()
    ub, ib = BOUNDS[1]
    with pytest.raises(UserError, match="\"sgd\" or \"adagrad\".*step count"):
        DSGDSolver(c, World(), grid_shard(0, 1, train, val, ub, ib, U, I))
    c = adagrad_cfg()
    c.train.weight_decay = 0.01
    with pytest.raises(UserError, match="weight_decay = 0"):
        DSGDSolver(c, World(), grid_shard(0, 1, train, val, ub, ib, U, I))
