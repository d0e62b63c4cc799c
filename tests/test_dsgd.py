"""distributed.dsgd + train.dsgd: the DSGD schedule on a real gloo ring (W = 2, 3, ragged
blocks, an empty block, an item nobody rated) equals a float64 one-process simulation of the
same schedule; W = 1 is the one-process Funk SGD bit for bit; on ML-100K W = 2 reaches the
one-process validation RMSE."""

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
