"""train/grid_loop.py: the refit phase on the grid (train ∪ validation for the best epoch
count) against the one-table refit, over gloo at W = 2, and a run killed in its refit that
resumes at another W."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multiprocess_harness import run_ranks

_REFIT = {"train.refit": True, "train.patience": 2, "train.checkpoint_every": 1}


def _cfg(ratings, epochs=3, **over):
    from test_grid import _grid_cfg

    return _grid_cfg(ratings, epochs, **{**_REFIT, **over})


def _refit_rank(rank, W, ratings, out, resume):
    from svdfill.distributed.world import DistWorld
    from svdfill.train.run import run_training

    world = DistWorld(rank, W, torch.device("cpu"), "gloo")
    return run_training(_cfg(ratings, **{"dist.layout": "grid"}), out, world=world, quiet=True,
                        resume=resume)


@pytest.fixture(scope="module")
def one_table(tmp_path_factory):
    """The one-table (items layout, one process) ALS run with refit on ML-100K."""
    from conftest import _data_file
    from svdfill import checkpoint as ck
    from svdfill.train.run import run_training

    ratings = _data_file("ml-100k", "u.data")
    out = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    s = run_training(_cfg(ratings), out, quiet=True)
    assert s["refit"] and s["refit"]["epochs"] == s["best_epoch"] >= 2
    return ratings, s, ck.load_model(out)


def _assert_same_refit(run_dir, s, one):
    """The grid run's summary, model and seen sets are the one-table refit's."""
    from test_grid import grid_tables

    _, s1, model = one
    for k in ("val_rmse", "train_rmse", "global_mean"):
        assert abs(s[k] - s1[k]) < 1e-6, (k, s[k], s1[k])
    r, r1 = s["refit"], s1["refit"]
    assert (r["epochs"], r["n_train"]) == (r1["epochs"], r1["n_train"])
    assert abs(r["train_rmse"] - r1["train_rmse"]) < 1e-6
    assert abs(r["global_mean"] - r1["global_mean"]) < 1e-9
    got = grid_tables(run_dir)
    for k, v in got.items():
        torch.testing.assert_close(v, model.state[k], rtol=1e-4, atol=1e-4, msg=k)
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in hist] == ["select"] * s["epochs_run"] + ["refit"] * r["epochs"]
    assert [h["epoch"] for h in hist if h["phase"] == "refit"] == list(range(1, r["epochs"] + 1))
    # trained on every rated pair: the saved "train" seen sets are the "all" ones
    from svdfill.distributed.grid_checkpoint import read_layout
    from svdfill.launch.fill_grid import load_grid_seen

    mdir = run_dir / "grid_model"
    lay = read_layout(mdir)["layout"]
    tp, ti = load_grid_seen(mdir, lay, 0, lay.n_users, "train")
    ap, ai = load_grid_seen(mdir, lay, 0, lay.n_users, "all")
    assert torch.equal(tp, ap) and torch.equal(ti, ai) and int(ap[-1]) == r["n_train"]


def test_grid_refit_w1_equals_the_one_table_refit(one_table, tmp_path):
    from svdfill.train.run import run_training

    s = run_training(_cfg(one_table[0], **{"dist.layout": "grid"}), tmp_path / "g", quiet=True)
    assert s["layout"] == "grid" and s["n_val"] > 0
    _assert_same_refit(tmp_path / "g", s, one_table)


class _Killed(Exception):
    pass


@pytest.mark.multiprocess
def test_grid_refit_w2_and_a_run_killed_in_its_refit_resumes_at_another_w(one_table, tmp_path,
                                                                          monkeypatch):
    """W = 2 over gloo refits as one table does. A W = 1 run killed in refit epoch 2
    (its refit epoch 1 checkpointed) resumes at W = 2 to the same model."""
    from svdfill.train.grid_als import GridALSSolver
    from svdfill.train.run import run_training

    ratings = one_table[0]
    res = run_ranks(_refit_rank, 2, ratings, tmp_path / "w2", False, timeout=240)
    assert all(r["val_rmse"] == res[0]["val_rmse"] for r in res)
    assert res[0]["world_size"] == 2
    _assert_same_refit(tmp_path / "w2", res[0], one_table)

    out = tmp_path / "killed"
    real = GridALSSolver.run_epoch

    def dies_in_refit(self, phase, epoch, progress):
        if phase == "refit" and epoch == 2:
            raise _Killed
        return real(self, phase, epoch, progress)

    monkeypatch.setattr(GridALSSolver, "run_epoch", dies_in_refit)
    with pytest.raises(_Killed):
        run_training(_cfg(ratings, **{"dist.layout": "grid"}), out, quiet=True)
    monkeypatch.setattr(GridALSSolver, "run_epoch", real)
    from svdfill.distributed.grid_checkpoint import read_layout

    tr = read_layout(out / "grid_checkpoint")["training"]
    assert (tr["phase"], tr["epoch"], tr["state"]) == ("refit", 1, "refit-state-e000001")
    assert tr["select"]["best_epoch"] == one_table[1]["best_epoch"]
    assert not (out / "grid_model").exists() and not (out / "summary.json").exists()
    res = run_ranks(_refit_rank, 2, ratings, out, True, timeout=240)
    _assert_same_refit(out, res[0], one_table)
    names = {p.name.split(".rank-")[0] for p in (out / "grid_checkpoint").glob("*.rank-*.pt")}
    assert names == {f"refit-state-e{res[0]['refit']['epochs']:06d}"}


def test_a_killed_refit_resumed_without_refit_is_refused(one_table, tmp_path):
    """Resuming a grid run whose checkpoint is a refit's with train.refit = false is
    refused, naming the setting, and the checkpoint is kept."""
    from svdfill.train.run import run_training

    out = tmp_path / "g"
    run_training(_cfg(one_table[0], **{"dist.layout": "grid"}), out, quiet=True)
    shutil.rmtree(out / "grid_model")
    (out / "summary.json").unlink()
    with pytest.raises(FileExistsError, match="differs in train.refit"):
        run_training(_cfg(one_table[0], **{"dist.layout": "grid", "train.refit": False}), out,
                     quiet=True, resume=True)
    assert (out / "grid_checkpoint" / "layout.json").is_file()


def test_dsgd_refit_w1_is_the_one_table_sgd_refit(tmp_path):
    """DSGD at W = 1 is FunkSGD step for step, in the refit too (train then validation
    ratings, the same order the one-table refit concatenates)."""
    from conftest import _data_file
    from svdfill.config import apply_overrides, load_config
    from svdfill.train.run import run_training

    ratings = _data_file("ml-100k", "u.data")
    torch.set_num_threads(1)
    got = {}
    for lay in ("items", "grid"):
        cfg = apply_overrides(load_config("ml-100k-sgd"), {
            "data.path": str(ratings), "train.epochs": 3, **_REFIT, "dist.layout": lay})
        got[lay] = run_training(cfg, tmp_path / lay, quiet=True)
    a, b = got["items"], got["grid"]
    assert a["refit"]["epochs"] == b["refit"]["epochs"] == a["best_epoch"]
    assert b["val_rmse"] == a["val_rmse"]
    assert b["refit"]["train_rmse"] == a["refit"]["train_rmse"]
