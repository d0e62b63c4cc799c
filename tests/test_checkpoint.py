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
    state = {"epoch": 3, "rng": torch.Generator().manual_seed(1).get_state(),
             "py": random.Random(2).getstate(),
             "np": np.random.default_rng(3).bit_generator.state,
             "opt": torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]).state_dict(),
             "history": [{"epoch": 1, "val_rmse": 0.9}], "best": None, "nan": float("nan")}
    ck.save_training_state(tmp_path, state)
    got = ck.load_training_state(tmp_path)
    assert got["epoch"] == 3 and torch.equal(got["rng"], state["rng"])
    assert got["py"] == state["py"] and got["np"] == state["np"]
    assert got["history"] == state["history"] and math.isnan(got["nan"])
    (tmp_path / "checkpoint.pt").write_bytes(b"\0" * 10)
    with pytest.raises(ck.CheckpointError, match="checkpoint.pt"):
        ck.load_training_state(tmp_path)


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
