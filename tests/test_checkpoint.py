"""Run-directory I/O: round trips, weights_only loading, atomic writes, clear errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from svdfill import checkpoint as ck
from svdfill.config import Config, apply_overrides, load_config
from svdfill.data.idmap import IdMap
from tests.s3_server import s3_bucket  # noqa: F401  (fixture)


def _state(U=5, I=4, d=3):
    g = torch.Generator().manual_seed(0)
    return {"user_factors": torch.randn(U, d, generator=g), "item_factors": torch.randn(I, d, generator=g),
            "user_bias": torch.randn(U, generator=g), "item_bias": torch.randn(I, generator=g),
            "global_mean": torch.tensor(3.5)}


def test_model_round_trip_weights_only(tmp_path):
    idmap = IdMap(np.array([1, 4, 9, 10, 12]), np.array(["a", "b", "c", "z"], dtype=object))
    cfg = apply_overrides(Config(), {"model.factors": 3, "train.seed": 7})
    ck.save_model(tmp_path, _state(), idmap, cfg, {"val_rmse": 0.9})
    # the file itself loads with the safe unpickler
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["format"] == ck.MODEL_FORMAT
    m = ck.load_model(tmp_path)
    for k, v in _state().items():
        assert torch.equal(m.state[k], v)
    assert m.idmap == idmap and repr(m.config) == repr(cfg) and m.metrics == {"val_rmse": 0.9}
    assert math.isnan(m.config.data.scale_min)  # NaN survives
    assert (m.n_users, m.n_items) == (5, 4)
    assert ck.load_model(tmp_path / "model.pt").idmap == idmap  # a file path works too


def test_missing_and_corrupt_model_errors_name_the_path(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such run directory"):
        ck.load_model(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="missing file"):
        ck.load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"garbage, not a zip")
    with pytest.raises(ck.CheckpointError, match=str(tmp_path / "model.pt")):
        ck.load_model(tmp_path)
    # a truncated real file
    idmap = IdMap(np.arange(5), np.arange(4))
    ck.save_model(tmp_path, _state(), idmap, Config(), {})
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.load_model(tmp_path)
    # a foreign torch file
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ck.CheckpointError, match="not an svdfill model"):
        ck.load_model(tmp_path)
    # id map that does not fit the tables
    ck.save_model(tmp_path, _state(), IdMap(np.arange(6), np.arange(4)), Config(), {})
    with pytest.raises(ck.CheckpointError, match="id map has 6 users"):
        ck.load_model(tmp_path)
    assert isinstance(ck.CheckpointError("x"), ValueError)


def test_seen_round_trip(tmp_path):
    train = (torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 0], dtype=torch.int32))
    full = (np.array([0, 3, 3, 4]), np.array([1, 2, 3, 0]))
    ck.save_seen(tmp_path, train, full)
    s = ck.load_seen(tmp_path)
    assert torch.equal(s["train"][0], train[0]) and s["train"][1].dtype == torch.int32
    assert s["all"][0].dtype == torch.int64 and s["all"][1].tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="not a CSR"):
        ck.save_seen(tmp_path, (torch.tensor([0, 5]), torch.tensor([1])), full)


def test_training_state_round_trip(tmp_path):
    import random

    assert ck.load_training_state(tmp_path) is None
    model = {"user_factors": torch.randn(3, 2), "item_factors": torch.randn(4, 2),
             "user_bias": torch.zeros(3), "item_bias": torch.zeros(4),
             "global_mean": torch.tensor(3.5)}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]).state_dict()
    state = ck.TrainingState(
        phase="select", epoch=3, model=model, optimizer={"item_bias": {"step": torch.tensor(2.0)}},
        solver=None, best=ck.BestEpoch(2, {"rmse": 0.9}, {k: v.clone() for k, v in model.items()}),
        bad_epochs=1, seconds=1.5, history=[{"epoch": 1, "val_rmse": 0.9}],
        rng={"seed": 0, "gen": torch.Generator().manual_seed(1).get_state()}, world_size=2,
        extra={"py": random.Random(2).getstate(), "np": np.random.default_rng(3).bit_generator.state,
               "opt": opt, "nan": float("nan")})
    ck.save_training_state(tmp_path, state)
    # the file is plain containers: it loads with weights_only
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["format"] == ck.TRAINING_FORMAT and raw["state"]["best"]["epoch"] == 2
    assert raw["state"]["py"] == state.extra["py"]  # extra entries sit at the top level
    got = ck.load_training_state(tmp_path)
    assert got.epoch == 3 and got.phase == "select" and got.world_size == 2
    assert torch.equal(got.rng["gen"], state.rng["gen"]) and got.best.epoch == 2
    assert torch.equal(got.best.state["user_factors"], model["user_factors"])
    assert got.extra["py"] == state.extra["py"] and got.extra["np"] == state.extra["np"]
    assert got.history == state.history and math.isnan(got.extra["nan"])
    assert got.to_dict().keys() == state.to_dict().keys()
    with pytest.raises(ValueError, match="repeats the fields"):
        ck.TrainingState(**{**vars(state), "extra": {"epoch": 1}}).to_dict()
    # a dict missing what a resume needs is refused with the file's name
    ck.atomic_torch_save(tmp_path / "checkpoint.pt", {"format": ck.TRAINING_FORMAT,
                                                      "state": {"epoch": 1}})
    with pytest.raises(ck.CheckpointError, match="checkpoint.pt.*lacks"):
        ck.load_training_state(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"\0" * 10)
    with pytest.raises(ck.CheckpointError, match="checkpoint.pt"):
        ck.load_training_state(tmp_path)


def test_state_keys_are_defined_once():
    from svdfill.distributed import ddp
    from svdfill.kernels import model

    assert ck.STATE_KEYS is model.STATE_KEYS == model.PARAMS + ("global_mean",)
    assert ddp.USER_PARAMS is model.USER_PARAMS and ddp.ITEM_PARAMS is model.ITEM_PARAMS


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    ck.atomic_write_text(p, "old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ck.atomic_write(p, boom)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind
    ck.atomic_write(p, lambda tmp: tmp.write_bytes(b"new"))
    assert p.read_text() == "new"


def test_config_echo_loads_back(tmp_path):
    cfg = apply_overrides(load_config(None), {"name": 'x "quoted"', "data.path": "a/b.csv",
                                              "train.refit": True, "train.lr": 1e-3})
    ck.save_config_echo(tmp_path, cfg)
    back = load_config(tmp_path / "config.toml")
    assert repr(back) == repr(cfg)  # NaN != NaN, so compare the text forms


def test_a_model_saved_before_the_solver_tables_loads(tmp_path):
    """model.pt of an earlier version holds flat train.burn_in / train.als_reg_exponent:
    svdfill wrote them, so they are mapped to [train.gibbs] / [train.als], not refused."""
    from svdfill.config import to_dict

    cfg = to_dict(Config())
    cfg["train"].pop("gibbs")
    cfg["train"].pop("als")
    cfg["train"].update({"burn_in": 4, "gibbs_overrelax": -0.5, "als_reg_exponent": 0.6})
    ck.save_model(tmp_path, _state(), IdMap(np.arange(5), np.arange(4)), cfg, {})
    m = ck.load_model(tmp_path)
    assert m.config.train.gibbs.burn_in == 4 and m.config.train.gibbs.overrelax == -0.5
    assert m.config.train.als.reg_exponent == 0.6 and m.config.train.gibbs.warm_start == 3


def test_model_read_from_s3_run_folder(tmp_path, s3_bucket, monkeypatch):
    """`--model s3://bucket/runs/x` (or …/model.pt): the run's files come through pyarrow.fs
    into a local cache, and the fill from there equals the fill of the local run."""
    import pyarrow.parquet as pq

    from svdfill.checkpoint import CheckpointError, load_model
    from test_publish import _run
    from test_torchrun import single_process_fill

    bucket, fs = s3_bucket
    monkeypatch.setenv("SVDFILL_CACHE", str(tmp_path / "cache"))
    run = _run(tmp_path)
    fs.create_dir(f"{bucket}/runs/x")
    for f in run.iterdir():
        with fs.open_output_stream(f"{bucket}/runs/x/{f.name}") as out:
            out.write(f.read_bytes())
    m = load_model(f"s3://{bucket}/runs/x")
    assert m.path.parent.parent == tmp_path / "cache" / "runs"
    assert torch.equal(m.state["user_factors"], load_model(run).state["user_factors"])
    assert load_model(f"s3://{bucket}/runs/x/model.pt").path == m.path  # the same cache entry
    got, ref = tmp_path / "remote.parquet", tmp_path / "local.parquet"
    single_process_fill(f"s3://{bucket}/runs/x", got, "--k", "3")  # seen.pt came along
    single_process_fill(run, ref, "--k", "3")
    assert pq.read_table(got).equals(pq.read_table(ref))
    with pytest.raises(CheckpointError, match=rf"s3://{bucket}/runs/none/model.pt: not found"):
        load_model(f"s3://{bucket}/runs/none")
