"""distributed/grid_checkpoint.py: per-rank block files + layout.json, re-blocking on load,
and a grid run killed after a checkpoint resuming at another world size."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from svdfill.checkpoint import CheckpointError
from svdfill.distributed import grid_checkpoint as gck
from svdfill.distributed.grid import GridLayout
from multiprocess_harness import run_ranks


def _full(U, I, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"user_factors": torch.randn(U, d, generator=g), "user_bias": torch.randn(U, generator=g),
            "item_factors": torch.randn(I, d, generator=g), "item_bias": torch.randn(I, generator=g)}


def _block(full, lay, r):
    (a, b), (c, e) = lay.user_bounds[r], lay.item_bounds[r]
    return {"user_factors": full["user_factors"][a:b], "user_bias": full["user_bias"][a:b],
            "item_factors": full["item_factors"][c:e], "item_bias": full["item_bias"][c:e]}


def test_save_and_reblock_any_row_range(tmp_path):
    U, I, d = 23, 11, 3
    full = _full(U, I, d)
    lay = GridLayout(U, I, [(0, 5), (5, 5), (5, 17), (17, 23)], [(0, 2), (2, 6), (6, 11), (11, 11)])
    for r in range(4):
        gck.save_grid_model(tmp_path, "m", lay, r, _block(full, lay, r))
    gck.write_layout(tmp_path, lay, {"factors": d}, names=["m"])
    assert not list(tmp_path.glob("*.tmp"))
    for lo, hi in [(0, U), (3, 9), (5, 5), (16, 18), (22, 23)]:
        got = gck.load_grid_rows(tmp_path, "m", "user", lo, hi)
        assert torch.equal(got["user_factors"], full["user_factors"][lo:hi])
        assert torch.equal(got["user_bias"], full["user_bias"][lo:hi])
    # resume at another W: the blocks of a new layout
    new = GridLayout(U, I, [(0, 12), (12, 23)], [(0, 7), (7, 11)])
    for r in range(2):
        b = gck.load_grid_block(tmp_path, "m", new, r)
        for k, v in _block(full, new, r).items():
            assert torch.equal(b[k], v), k
    obj = torch.load(tmp_path / gck.rank_file("m", 2, 4), weights_only=True, mmap=True)
    assert int(obj["user_lo"]) == 5 and int(obj["item_lo"]) == 6


def test_missing_or_foreign_files_are_named(tmp_path):
    lay = GridLayout(4, 4, [(0, 2), (2, 4)], [(0, 2), (2, 4)])
    with pytest.raises(CheckpointError, match="no grid model"):
        gck.load_grid_rows(tmp_path, "m", "user", 0, 4)
    gck.save_grid_model(tmp_path, "m", lay, 0, _block(_full(4, 4, 2), lay, 0))
    gck.write_layout(tmp_path, lay, {}, names=["m"])
    assert gck.load_grid_rows(tmp_path, "m", "user", 0, 2)["user_factors"].shape == (2, 2)
    with pytest.raises(CheckpointError, match="missing rank file"):
        gck.load_grid_rows(tmp_path, "m", "user", 1, 3)
    (tmp_path / gck.rank_file("m", 1, 2)).write_bytes(b"not torch")
    with pytest.raises(CheckpointError, match="unreadable"):
        gck.load_grid_rows(tmp_path, "m", "item", 2, 4)
    with pytest.raises(ValueError, match="rows"):
        gck.save_grid_model(tmp_path, "x", lay, 1, _block(_full(5, 4, 2), GridLayout(
            5, 4, [(0, 2), (2, 5)], [(0, 2), (2, 4)]), 1))
    (tmp_path / gck.LAYOUT_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an svdfill grid"):
        gck.read_layout(tmp_path)


def _train_rank(rank, W, ratings, out, epochs, resume):
    from test_grid import _train_rank as train

    return train(rank, W, ratings, out, epochs, resume)


@pytest.mark.multiprocess
def test_killed_grid_run_resumes_at_another_world_size(tmp_path):
    """W = 2 trains 2 epochs and is 'killed' after its checkpoint (final outputs removed);
    W = 1 resumes to 4 epochs: the model and history of an uninterrupted W = 1 run."""
    from conftest import _data_file
    from svdfill.train.run import run_training
    from test_grid import _grid_cfg, grid_tables

    ratings = _data_file("ml-100k", "u.data")
    torch.set_num_threads(1)
    whole = tmp_path / "whole"
    s_whole = run_training(_grid_cfg(ratings, 4, **{"dist.layout": "grid"}), whole, quiet=True)
    out = tmp_path / "killed"
    run_ranks(_train_rank, 2, ratings, out, 2, False, timeout=240)
    rec = gck.read_layout(out / "grid_checkpoint")
    assert rec["world_size"] == 2 and rec["training"]["epoch"] == 2
    assert len(list((out / "grid_checkpoint").glob("*.rank-*.pt"))) == 2  # best = state: one set
    shutil.rmtree(out / "grid_model")
    (out / "summary.json").unlink()
    s = run_training(_grid_cfg(ratings, 4, **{"dist.layout": "grid"}), out, quiet=True, resume=True)
    assert s["epochs_run"] == 4 and s["world_size"] == 1
    assert abs(s["val_rmse"] - s_whole["val_rmse"]) < 1e-6
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    a, b = grid_tables(whole), grid_tables(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    # asked again, the finished run is done
    s2 = run_training(_grid_cfg(ratings, 4, **{"dist.layout": "grid"}), out, quiet=True, resume=True)
    assert s2["val_rmse"] == s["val_rmse"]


def test_ray_restore_swaps_in_the_reported_grid_folder(tmp_path):
    """After a Ray restart the reported grid_checkpoint/ (rank files + layout.json) replaces
    the run directory's, and its epoch is what the workers resume from."""
    from svdfill.distributed.ray_train import _restore_grid

    lay = GridLayout(4, 4, [(0, 2), (2, 4)], [(0, 1), (1, 4)])
    full = _full(4, 4, 2)
    src = tmp_path / "reported" / "grid_checkpoint"
    for r in range(2):
        gck.save_grid_model(src, "state-e000003", lay, r, _block(full, lay, r))
    gck.write_layout(src, lay, {"training": {"epoch": 3}}, names=["state-e000003"])
    run = tmp_path / "run"
    (run / "grid_checkpoint").mkdir(parents=True)
    (run / "grid_checkpoint" / "stale.rank-00000-of-00001.pt").write_bytes(b"x")
    assert _restore_grid(src, run) == 3
    names = sorted(p.name for p in (run / "grid_checkpoint").iterdir())
    assert names == sorted(p.name for p in src.iterdir())
    got = gck.load_grid_rows(run / "grid_checkpoint", "state-e000003", "user", 0, 4)
    assert torch.equal(got["user_factors"], full["user_factors"])
    assert sorted(p.name for p in run.iterdir()) == ["grid_checkpoint"]


def test_grid_gibbs_resumes_its_chain_exactly(tmp_path):
    """A grid Gibbs run stopped after its epoch-2 checkpoint and resumed to 4 sweeps equals
    the uninterrupted run: the chain (draws, α, the posterior mean's blocks) is checkpointed."""
    from conftest import _data_file
    from svdfill.config import apply_overrides, load_config
    from svdfill.train.run import run_training

    ratings = _data_file("ml-100k", "u.data")

    def cfg(epochs):
        return apply_overrides(load_config("ml-100k"), {
            "data.path": str(ratings), "train.epochs": epochs, "train.checkpoint_every": 2,
            "train.gibbs.burn_in": 1, "train.gibbs.warm_start": 1, "dist.layout": "grid"})

    whole = run_training(cfg(4), tmp_path / "whole", quiet=True)
    out = tmp_path / "cut"
    run_training(cfg(2), out, quiet=True)
    shutil.rmtree(out / "grid_model")
    (out / "summary.json").unlink()
    s = run_training(cfg(4), out, quiet=True, resume=True)
    assert s["epochs_run"] == 4 and s["val_rmse"] == whole["val_rmse"]
    from test_grid import grid_tables

    a, b = grid_tables(tmp_path / "whole"), grid_tables(out)
    assert set(a) == {"user_factors", "user_bias", "item_factors", "item_bias"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_grid_dsgd_adagrad_resumes_exactly(tmp_path):
    """DSGD with Adagrad (grid layout) stopped after its epoch-2 checkpoint and resumed to 4
    epochs equals the uninterrupted run: the checkpoint holds the blocks' Adagrad sums."""
    from conftest import _data_file
    from svdfill.config import apply_overrides, load_config
    from svdfill.train.run import run_training
    from test_grid import grid_tables

    ratings = _data_file("ml-100k", "u.data")

    def cfg(epochs):
        return apply_overrides(load_config("ml-100k-sgd"), {
            "data.path": str(ratings), "train.epochs": epochs, "train.checkpoint_every": 2,
            "train.optimizer": "adagrad", "train.lr": 0.05, "train.batch_size": 512,
            "model.factors": 16, "dist.layout": "grid"})

    whole = run_training(cfg(4), tmp_path / "whole", quiet=True)
    out = tmp_path / "cut"
    run_training(cfg(2), out, quiet=True)
    saved = gck.load_grid_rows(out / "grid_checkpoint", "state-e000002", "item", 0, 10)
    assert {"item_factors_sum", "item_bias_sum"} <= set(saved)
    shutil.rmtree(out / "grid_model")
    (out / "summary.json").unlink()
    s = run_training(cfg(4), out, quiet=True, resume=True)
    assert s["epochs_run"] == 4 and s["val_rmse"] == whole["val_rmse"]
    assert s["optimizer"] == "adagrad"
    a, b = grid_tables(tmp_path / "whole"), grid_tables(out)
    assert set(a) == {"user_factors", "user_bias", "item_factors", "item_bias"}  # model only
    for k in a:
        assert torch.equal(a[k], b[k]), k
