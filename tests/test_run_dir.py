"""svdfill.train.run_dir: the identity of a run (config_differences); the shard selection
fit trains on (distributed.sharding.select_shard, the identity for the whole catalogue)."""

from __future__ import annotations

import torch

from svdfill.config import Config, apply_overrides
from svdfill.data.dataset import Ratings
from svdfill.distributed.sharding import select_shard
from svdfill.train.run_dir import config_differences


def test_localize_and_config_differences():
    r = Ratings(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32),
                torch.tensor([1.0, 2.0, 3.0]), 3, 5)
    assert select_shard(r, 0, 5) is r
    loc = select_shard(r, 3, 5)
    assert loc.items.tolist() == [0, 1] and loc.users.tolist() == [1, 2] and loc.n_items == 2
    from svdfill.config import to_dict

    a = to_dict(Config())
    b = to_dict(apply_overrides(Config(), {"train.epochs": 3, "train.lr": 0.5, "fill.k": 3}))
    assert config_differences(a, b) == ["train.lr"]


def test_a_run_directory_written_before_the_solver_tables_is_the_same_run(tmp_path):
    """config.toml of an earlier version (flat train.burn_in, train.gibbs_*): its keys are
    mapped to [train.gibbs], so the same settings are the same run, other settings not."""
    import pytest

    from svdfill import checkpoint as ck
    from svdfill.config import to_dict
    from svdfill.train.run_dir import prepare_run_dir

    cfg = apply_overrides(Config(), {"train.solver": "gibbs", "train.gibbs.burn_in": 3,
                                     "train.gibbs.warm_start": 2})
    old = to_dict(cfg)
    g = old["train"].pop("gibbs")
    a = old["train"].pop("als")
    old["train"].update({"burn_in": g["burn_in"], "gibbs_warm_start": g["warm_start"],
                         "gibbs_overrelax": g["overrelax"], "als_reg_exponent": a["reg_exponent"]})
    ck.save_config_echo(tmp_path, old)
    (tmp_path / ck.CHECKPOINT_FILE).write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already holds this run"):
        prepare_run_dir(tmp_path, cfg, resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path, cfg, resume=True, overwrite=False) == "resume"
    other = apply_overrides(cfg, {"train.gibbs.burn_in": 4})
    with pytest.raises(FileExistsError, match="differs in train.gibbs.burn_in"):
        prepare_run_dir(tmp_path, other, resume=True, overwrite=False)
