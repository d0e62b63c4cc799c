"""distributed/grid.py and grid ALS: blocks, routing, the row exchange (rows and bytes
against a brute-force reading of the whole data), and grid ALS / Gibbs at W = 1, 2 against
one process on ML-100K."""

from __future__ import annotations

import pytest
import torch

from svdfill.distributed.grid import GridLayout, grid_bounds, needed_ids
from multiprocess_harness import run_ranks


def test_grid_bounds_even_balanced_and_empty():
    assert grid_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert grid_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    counts = torch.tensor([9, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    b = grid_bounds(10, 2, counts)
    assert b[0] == (0, 1) and b[1] == (1, 10)  # the heavy id alone
    with pytest.raises(ValueError):
        grid_bounds(3, 2, torch.tensor([1, 1]))


def test_layout_owners_and_record_round_trip():
    lay = GridLayout(7, 5, [(0, 0), (0, 4), (4, 7)], [(0, 2), (2, 2), (2, 5)])
    assert lay.user_owner(torch.tensor([0, 3, 4, 6])).tolist() == [1, 1, 2, 2]
    assert lay.item_owner(torch.tensor([0, 1, 2, 4])).tolist() == [0, 0, 2, 2]
    import json

    assert GridLayout.from_record(json.loads(json.dumps(lay.to_record()))) == lay
    with pytest.raises(ValueError, match="tile"):
        GridLayout(7, 5, [(0, 3), (4, 7)], [(0, 2), (2, 5)])


def _random_world(seed=11, U=37, I=23, n=300):
    g = torch.Generator().manual_seed(seed)
    key = torch.randperm(U * I, generator=g)[:n]
    return U, I, key // I, key % I, torch.rand(n, generator=g) * 4 + 1


def _exchange_rank(rank, W):
    from svdfill.distributed.grid import RowExchange, route_ratings
    from svdfill.distributed.world import DistWorld

    U, I, u, i, r = _random_world()
    world = DistWorld(rank, W, torch.device("cpu"), "gloo")
    counts = torch.bincount(u, minlength=U)
    lay = GridLayout(U, I, grid_bounds(U, W, counts), grid_bounds(I, W))
    share = torch.arange(len(r)) % W == rank  # an arbitrary share read by this rank
    by_user, by_item = route_ratings(world, lay, u[share], i[share], r[share])
    need, _ = needed_ids(by_user[1])
    ex = RowExchange(world, need, lay.item_bounds)
    full = torch.arange(I * 3, dtype=torch.float32).view(I, 3) * 1.5  # a table no rank holds whole
    i_lo, i_hi = lay.item_bounds[rank]
    got = ex.fetch(full[i_lo:i_hi])
    got2 = ex.fetch(full[i_lo:i_hi])
    return lay, [t.tolist() for t in by_user], [t.tolist() for t in by_item], need.tolist(), \
        got.tolist(), got2.tolist(), ex.bytes_sent, ex.bytes_received


@pytest.mark.multiprocess
def test_route_and_exchange_against_the_whole_data():
    W = 3
    U, I, u, i, r = _random_world()
    res = run_ranks(_exchange_rank, W)
    lay = res[0][0]
    full = torch.arange(I * 3, dtype=torch.float32).view(I, 3) * 1.5
    need_of = []
    for rank, (_, bu, bi, need, got, got2, sent, recv) in enumerate(res):
        (u_lo, u_hi), (i_lo, i_hi) = lay.user_bounds[rank], lay.item_bounds[rank]
        mu, mi = (u >= u_lo) & (u < u_hi), (i >= i_lo) & (i < i_hi)
        # the same ratings (as sets of triples) as filtering the whole data
        assert sorted(zip(*bu)) == sorted(zip(u[mu].tolist(), i[mu].tolist(), r[mu].tolist()))
        assert sorted(zip(*bi)) == sorted(zip(u[mi].tolist(), i[mi].tolist(), r[mi].tolist()))
        assert need == sorted(set(i[mu].tolist()))
        assert got == full[need].tolist() == got2
        need_of.append(torch.tensor(need, dtype=torch.int64))
        # received: 2 fetches × 4 bytes × 3 columns × needed rows owned elsewhere
        ext = int((lay.item_owner(need_of[-1]) != rank).sum())
        assert recv == 2 * 4 * 3 * ext
    for s in range(W):  # sent: the rows of s's block that the other ranks need
        want = sum(int((lay.item_owner(need_of[q]) == s).sum()) for q in range(W) if q != s)
        assert res[s][6] == 2 * 4 * 3 * want
    assert sum(x[6] for x in res) == sum(x[7] for x in res) > 0


def _grid_cfg(ratings, epochs=3, **over):
    from svdfill.config import apply_overrides, load_config

    return apply_overrides(load_config("ml-100k-als"),
                           {"data.path": str(ratings), "train.epochs": epochs, **over})


def _train_rank(rank, W, ratings, out, epochs, resume):
    from svdfill.distributed.world import DistWorld
    from svdfill.train.run import run_training

    world = DistWorld(rank, W, torch.device("cpu"), "gloo")
    cfg = _grid_cfg(ratings, epochs, **{"dist.layout": "grid"})
    return run_training(cfg, out, world=world, quiet=True, resume=resume)


def grid_tables(run_dir):
    """Full tables reassembled from a grid model (test-side only)."""
    from svdfill.distributed.grid_checkpoint import load_grid_rows, read_layout

    d = run_dir / "grid_model"
    lay = read_layout(d)["layout"]
    return {**load_grid_rows(d, "model", "user", 0, lay.n_users),
            **load_grid_rows(d, "model", "item", 0, lay.n_items)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from conftest import _data_file
    from svdfill import checkpoint as ck
    from svdfill.train.run import run_training

    ratings = _data_file("ml-100k", "u.data")
    out = tmp_path_factory.mktemp("single") / "run"
    torch.set_num_threads(1)
    s = run_training(_grid_cfg(ratings), out, quiet=True)
    return ratings, s, ck.load_model(out).state


def _assert_same_model(grid_dir, summary, one):
    _, s1, state = one
    assert abs(summary["val_rmse"] - s1["val_rmse"]) < 1e-6, (summary["val_rmse"], s1["val_rmse"])
    assert abs(summary["train_rmse"] - s1["train_rmse"]) < 1e-6
    got = grid_tables(grid_dir)
    for k, v in got.items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-4, msg=k)


def test_grid_w1_in_process_equals_one_process(one_process, tmp_path):
    from svdfill.train.run import run_training

    ratings = one_process[0]
    s = run_training(_grid_cfg(ratings, **{"dist.layout": "grid"}), tmp_path / "g", quiet=True)
    assert s["layout"] == "grid" and s["world_size"] == 1
    assert s["sweep_bytes_sent_max"] == 0
    _assert_same_model(tmp_path / "g", s, one_process)
    assert not (tmp_path / "g" / "model.pt").exists()


@pytest.mark.multiprocess
def test_grid_torch_distributed_equals_one_process(one_process, tmp_path):
    """W = 2 over gloo, each rank reading its share of the file: the one-process model, and
    the bytes of the byte model (the exchange test runs at W = 3)."""
    W = 2
    ratings = one_process[0]
    out = tmp_path / "g"
    res = run_ranks(_train_rank, W, ratings, out, 3, False, timeout=240)
    s = res[0]
    assert all(r["val_rmse"] == s["val_rmse"] for r in res)
    assert s["world_size"] == W and s["ingest"] == "each rank its share"
    _assert_same_model(out, s, one_process)
    # the bytes counted through the collectives are the module's byte model of the data
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.distributed.grid import sweep_bytes
    from svdfill.distributed.grid_checkpoint import read_layout

    cfg = _grid_cfg(ratings)
    tr, _ = split(load_dataset(cfg.data)[0], how="random", fraction=cfg.data.val_fraction,
                  seed=cfg.data.split_seed)
    sent, recv = sweep_bytes(read_layout(out / "grid_model")["layout"], tr.users, tr.items,
                             cfg.model.factors)
    assert s["sweep_bytes_sent_max"] == max(sent) > 0
    assert s["sweep_bytes_sent_total"] == sum(sent) == sum(recv)
    assert (s["sweep_bytes_sent_rank0"], s["sweep_bytes_received_rank0"]) == (sent[0], recv[0])


def _gibbs_rank(rank, W, ratings, out):
    from svdfill.config import apply_overrides, load_config
    from svdfill.distributed.world import DistWorld
    from svdfill.train.run import run_training

    world = DistWorld(rank, W, torch.device("cpu"), "gloo")
    cfg = apply_overrides(load_config("ml-100k"), {"data.path": str(ratings), "train.epochs": 8,
                                                   "dist.layout": "grid"})
    return run_training(cfg, out, world=world, quiet=True)


@pytest.mark.multiprocess
def test_grid_gibbs_w2_fits_as_one_process(tmp_path):
    """The chain on the grid (per-rank noise streams): not bit-equal to one process, the
    same fit — validation RMSE within 0.005 after the same sweeps, every rank agreeing."""
    from conftest import _data_file
    from svdfill.config import apply_overrides, load_config
    from svdfill.train.run import run_training

    ratings = _data_file("ml-100k", "u.data")
    torch.set_num_threads(1)
    one = run_training(apply_overrides(load_config("ml-100k"), {"data.path": str(ratings),
                                                                "train.epochs": 8}),
                       tmp_path / "one", quiet=True)
    res = run_ranks(_gibbs_rank, 2, ratings, tmp_path / "grid", timeout=240)
    s = res[0]
    assert all(r["val_rmse"] == s["val_rmse"] for r in res)
    assert s["solver"] == "gibbs" and s["world_size"] == 2
    assert abs(s["val_rmse"] - one["val_rmse"]) < 0.005, (s["val_rmse"], one["val_rmse"])
    assert s["val_rmse"] < 0.905


def test_layout_config_is_checked():
    from svdfill.config import Config, ConfigError, apply_overrides

    assert Config().dist.layout == "items"
    with pytest.raises(ConfigError, match="dist.layout"):
        apply_overrides(Config(), {"dist.layout": "rows"})
    assert apply_overrides(Config(), {"dist.layout": "grid", "train.refit": True}).train.refit


def test_eval_refuses_a_grid_run_clearly(tmp_path):
    from svdfill import checkpoint as ck
    from svdfill.distributed.grid_checkpoint import write_layout

    write_layout(tmp_path / "grid_model", GridLayout(2, 2, [(0, 2)], [(0, 2)]), {}, names=[])
    with pytest.raises(ck.CheckpointError, match="grid-layout run"):
        ck.load_model(tmp_path)
