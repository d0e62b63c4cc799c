"""World hooks: the single-process identity, and a real 2-process gloo group on 127.0.0.1
(collectives, item-table gather, shard top-k gather, DDP over the user table)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from multiprocess_harness import RankFailed, run_ranks

from svdfill.distributed.world import DistWorld, World


def test_single_process_world_is_identity():
    w = World()
    assert w.is_main and w.world_size == 1 and w.item_range(7) == (0, 7)
    t = torch.arange(3.0)
    assert w.all_reduce_sum(t) is t and w.all_reduce_max_int(4) == 4
    tables = {"item_factors": torch.ones(7, 2)}
    assert w.gather_items(tables, 7) is tables
    assert w.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert w.wrap(model) is model
    w.barrier()
    w.report_epoch({"epoch": 1}, None)
    assert w.with_shard(2, 5).item_range(7) == (2, 5)


def _collectives(rank: int, world_size: int) -> None:
    shards = [(0, 3), (3, 8)]  # uneven on purpose
    w = DistWorld(rank, world_size, torch.device("cpu"), "gloo", shards)
    assert w.item_range(8) == shards[rank] and w.is_main == (rank == 0)
    t = torch.tensor([1.0, rank + 1.0])
    w.all_reduce_sum(t)
    assert t.tolist() == [2.0, 3.0]
    assert w.all_reduce_max_int(10 + rank) == 11
    assert w.broadcast_object({"r": rank}) == {"r": 0}
    full_q = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    full_b = torch.arange(8, dtype=torch.float32) * -1
    lo, hi = shards[rank]
    got = w.gather_items({"item_factors": full_q[lo:hi], "item_bias": full_b[lo:hi]}, 8)
    if rank == 0:
        assert torch.equal(got["item_factors"], full_q) and torch.equal(got["item_bias"], full_b)
    else:
        assert got is None

    # shard top-k gathered and merged equals the top-k over all items
    from svdfill.distributed.gather import gather_topk
    from svdfill.kernels.fill import fill_topk

    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(5, 4, generator=g), torch.randn(8, 4, generator=g)
    bu, bi = torch.randn(5, generator=g), torch.randn(8, generator=g)
    Q[6] = Q[1]; bi[6] = bi[1]  # a tie across shards → lower id wins
    ref = fill_topk(P, Q, bu, bi, 3.5, 4)
    s, i = fill_topk(P, Q[lo:hi], bu, bi[lo:hi], 3.5, 4, item_offset=lo)
    merged = gather_topk(s, i, world_size, rank, torch.device("cpu"))
    if rank == 0:
        # same items; scores equal up to the GEMM's rounding for another matrix shape
        assert torch.equal(merged[1], ref[1])
        torch.testing.assert_close(merged[0], ref[0], rtol=1e-6, atol=1e-6)
    else:
        assert merged is None
    w.barrier()


def _ddp_step(rank: int, world_size: int, sparse: bool) -> None:
    """One W=2 DDP step over item-sharded batches equals one single-process step over
    their union (summed loss): user tables identical on both ranks and equal to the
    reference; each rank's item rows updated as in the reference."""
    from svdfill.kernels.model import BiasedMF

    U, I, d = 6, 5, 3
    shards = [(0, 2), (2, 5)]
    lo, hi = shards[rank]
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, U, (40,), generator=g)
    items = torch.randint(0, I, (40,), generator=g)
    ratings = torch.rand(40, generator=g) * 4 + 1

    def model_for(n_items, offset):
        kw = {"sparse": sparse} if sparse else {}
        m = BiasedMF(U, I, d, init_std=0.1, global_mean=3.0, seed=0, **kw)
        full = {k: v.detach().clone() for k, v in m.state_dict().items()}
        m2 = BiasedMF(U, n_items, d, init_std=0.1, global_mean=3.0, seed=0, item_offset=offset, **kw)
        with torch.no_grad():
            for k in ("user_factors", "user_bias"):
                getattr(m2, k).copy_(full[k])
            m2.item_factors.copy_(full["item_factors"][offset:offset + n_items])
            m2.item_bias.copy_(full["item_bias"][offset:offset + n_items])
        return m2

    def step(model, wrapped, u, i, r):
        pred = wrapped(u, i)
        loss = ((pred - r) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    g_ = p.grad.to_dense() if p.grad.is_sparse else p.grad
                    p -= 0.05 * g_
                    p.grad = None

    ref = model_for(I, 0)
    step(ref, ref, users, items, ratings)

    w = DistWorld(rank, world_size, torch.device("cpu"), "gloo", shards, sparse_users=sparse)
    mine = model_for(hi - lo, lo)
    keep = (items >= lo) & (items < hi)
    wrapped = w.wrap(mine)
    step(mine, wrapped, users[keep], items[keep] - lo, ratings[keep])
    torch.testing.assert_close(mine.user_factors, ref.user_factors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.user_bias, ref.user_bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.item_factors, ref.item_factors[lo:hi], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.item_bias, ref.item_bias[lo:hi], rtol=1e-5, atol=1e-6)


def _sparse_adam_fits(rank: int, world_size: int) -> None:
    """sparse_adam at W=2 both ways the trainer syncs the user rows — DDP over autograd's
    sparse gradients (gloo) and the dense all-reduce of kernels.row_optim's sums (what
    nccl gets) — gives one result; so does Adagrad (DDP dense vs the row step's sums)."""
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.distributed.sharding import even_shards
    from svdfill.train import fit
    from test_row_optim import _trainer_cfg

    cfg = _trainer_cfg()
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    ref = fit(cfg, train, val, quiet=True)
    shards = even_shards(train.n_items, world_size)
    runs = [fit(cfg, train, val, DistWorld(rank, world_size, torch.device("cpu"), "gloo", shards,
                                           sparse_users=sparse), quiet=True)
            for sparse in (True, False)]
    # the same W=2 batches either way: equal up to float summation order
    for a, b in zip(*(r.history for r in runs)):
        assert abs(a["val_rmse"] - b["val_rmse"]) < 1e-5, (a, b)
    if rank == 0:
        for k in ref.state:
            torch.testing.assert_close(runs[1].state[k], runs[0].state[k], rtol=1e-4, atol=1e-5,
                                       msg=k)
    # batch_size is per rank: W=2 takes half the steps of twice the size, so it is not the
    # one-process run; it learns as that one does
    for r in (ref, runs[1]):
        assert r.summary["val_rmse"] < r.history[0]["val_rmse"] - 0.005
    # Adagrad: DDP's dense all-reduce of autograd's gradients vs the row step's sums
    import warnings

    from svdfill.config import apply_overrides

    ada = apply_overrides(cfg, {"train.optimizer": "adagrad", "train.lr": 0.05})
    w = DistWorld(rank, world_size, torch.device("cpu"), "gloo", shards)
    dense = fit(ada, train, val, w, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "fused" on CPU: the torch twin
        rows = fit(apply_overrides(ada, {"train.kernel": "fused"}), train, val, w, quiet=True)
    for a, b in zip(dense.history, rows.history):
        assert abs(a["val_rmse"] - b["val_rmse"]) < 1e-5, (a, b)


def _als_fits(rank: int, world_size: int) -> None:
    """ALS at W=2 (item shards, the users' normal equations all-reduced in blocks) is the
    one-process run up to float summation order: same RMSE every sweep, same tables. The
    budget cuts the 500 users into blocks of 12."""
    import svdfill.kernels.als as als
    from svdfill.config import apply_overrides
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.distributed.sharding import even_shards
    from svdfill.train import fit
    from test_row_optim import _trainer_cfg

    cfg = apply_overrides(_trainer_cfg(), {"train.solver": "als", "train.reg_factors": 0.05,
                                           "train.reg_bias": 0.05, "train.epochs": 3})
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    budget = als.DEFAULT_BUDGET_ELEMENTS
    als.DEFAULT_BUDGET_ELEMENTS = 12 * 25  # k = 5: 12 users a block
    try:
        ref = fit(cfg, train, val, quiet=True)
        shards = even_shards(train.n_items, world_size)
        got = fit(cfg, train, val, DistWorld(rank, world_size, torch.device("cpu"), "gloo", shards),
                  quiet=True)
    finally:
        als.DEFAULT_BUDGET_ELEMENTS = budget
    for a, b in zip(ref.history, got.history, strict=True):
        assert abs(a["val_rmse"] - b["val_rmse"]) < 1e-5, (a, b)
    mean_only = float((val.ratings - train.ratings.mean()).pow(2).mean().sqrt())
    assert got.summary["val_rmse"] < 0.9 * mean_only  # it learned
    if rank == 0:
        for k in ref.state:
            torch.testing.assert_close(got.state[k], ref.state[k], rtol=1e-3, atol=1e-4, msg=k)


def _all_checks(rank: int, world_size: int) -> None:
    """Everything in one process group (spawning costs more than the checks)."""
    _collectives(rank, world_size)
    _ddp_step(rank, world_size, sparse=False)  # dense all-reduce (what nccl does)
    _ddp_step(rank, world_size, sparse=True)   # gloo's sparse all-reduce
    _sparse_adam_fits(rank, world_size)
    _als_fits(rank, world_size)


def _echo_or_raise(rank: int, world_size: int, failing_rank: int) -> dict:
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    if rank == failing_rank:
        raise ValueError(f"planted on rank {rank}")
    return {"rank": rank, "sum": t.item()}


@pytest.mark.multiprocess
def test_harness_returns_each_rank_result_and_names_the_failing_rank():
    """tests/multiprocess_harness.py: results come back in rank order; a rank that raises
    is reported with its number and traceback while its peer, stuck in the next
    collective, is stopped."""
    assert run_ranks(_echo_or_raise, 2, -1) == [{"rank": 0, "sum": 3.0}, {"rank": 1, "sum": 3.0}]
    with pytest.raises(RankFailed, match=r"(?s)rank 1 raised:.*ValueError: planted on rank 1"):
        run_ranks(_echo_or_raise, 2, 1, timeout=60)


@pytest.mark.multiprocess
def test_gloo_world_collectives_gathers_and_ddp():
    """Real 2-process gloo group: all-reduce, max, broadcast, item-table gather with uneven
    shards, shard top-k gather + merge, a DDP step (dense and sparse) that equals the
    single-process step over the union of the ranks' batches, sparse_adam training at
    W=2 (sparse DDP and dense sums) equal to one process, and ALS at W=2 equal to one process."""
    run_ranks(_all_checks, 2)


def test_backend_choice():
    from svdfill.distributed.process_group import init_from_env, resolve_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu) == "gloo" and resolve_backend("auto", gpu) == "nccl"
    assert resolve_backend("gloo", gpu) == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        resolve_backend("nccl", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("mpi", cpu)
    # outside torchrun: a one-process world, no group created
    if not any(v in __import__("os").environ for v in ("RANK", "WORLD_SIZE")):
        assert init_from_env("cpu") == (0, 1, cpu, "gloo") and not dist.is_initialized()


def _nccl_checks(rank: int, world_size: int) -> None:
    dev = torch.device("cuda", rank)
    w = DistWorld(rank, world_size, dev, "nccl", [(0, 3), (3, 8)][:world_size] if world_size == 2 else [(0, 8)])
    assert w.comm_device == dev and not w.sparse_users
    t = torch.ones(2, device=dev)
    assert w.all_reduce_sum(t).tolist() == [world_size] * 2
    cpu_t = torch.ones(2)  # CPU tensors travel through the GPU and come back
    assert w.all_reduce_sum(cpu_t).device.type == "cpu" and cpu_t.tolist() == [world_size] * 2
    assert w.all_reduce_max_int(rank) == world_size - 1
    lo, hi = w.item_range(8)
    full = torch.arange(8.0, device=dev)
    got = w.gather_items({"item_bias": full[lo:hi]}, 8)
    if rank == 0:
        assert torch.equal(got["item_bias"], full)
    from svdfill.kernels.model import BiasedMF

    m = BiasedMF(5, hi - lo, 3, init_std=0.1, seed=0, item_offset=lo).to(dev)
    wrapped = w.wrap(m)  # dense DDP over the user table on nccl
    wrapped(torch.tensor([0, 1], device=dev), torch.tensor([0, 1], device=dev)).sum().backward()
    assert m.user_factors.grad is not None and not m.user_factors.grad.is_sparse
    # sparse_adam on nccl: the user sums travel densely (DDP cannot carry sparse grads)
    from svdfill.config import apply_overrides
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.distributed.sharding import even_shards
    from svdfill.train import fit
    from test_row_optim import _trainer_cfg

    cfg = apply_overrides(_trainer_cfg(), {"train.kernel": "fused", "train.device": "cuda"})
    train, val = split(load_dataset(cfg.data)[0], fraction=0.1, seed=0)
    res = fit(cfg, train, val, w.with_shards(even_shards(train.n_items, world_size)),
              quiet=True)
    assert res.summary["val_rmse"] < res.history[0]["val_rmse"] - 0.005
    w.barrier()


@pytest.mark.multiprocess
@pytest.mark.cuda
def test_nccl_world(cuda):
    """nccl with one rank per GPU (2 when the machine has them, else 1)."""
    run_ranks(_nccl_checks, min(2, torch.cuda.device_count()), backend="nccl")


@pytest.mark.parametrize("device,backend,want", [
    ("cuda", "nccl", "one GPU per rank"), ("cuda:0", "nccl", "one GPU per rank"),
    ("cuda", "auto", "gloo"), ("cuda:0", "auto", "gloo")])
def test_ranks_sharing_a_gpu_do_not_reach_nccl(monkeypatch, device, backend, want):
    """torchrun --nproc 2 on a one-GPU box (or --device cuda:0 for every rank): NCCL would
    fail at communicator init, so nccl is refused and auto falls back to gloo (CUDA faked:
    no group is created, init_process_group is recorded)."""
    from svdfill.distributed import process_group as pg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(pg.dist, "is_initialized", lambda: False)
    seen = []
    monkeypatch.setattr(pg.dist, "init_process_group", lambda be, **k: seen.append((be, k)))
    monkeypatch.setattr(pg.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(pg.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(pg.dist, "get_backend", lambda: seen[-1][0])
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    if backend == "nccl":
        with pytest.raises(ValueError, match=want):
            pg.init_from_env(device, backend)
        assert seen == []
    else:
        with pytest.warns(RuntimeWarning, match="one GPU per rank"):
            got = pg.init_from_env(device, backend)
        assert got[3] == "gloo" and seen[0][0] == "gloo" and "device_id" not in seen[0][1]
    assert pg.shared_gpu("cuda", 1) is None and pg.shared_gpu("cpu", 4) is None
