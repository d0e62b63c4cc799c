"""Warm start (train.init_from): rows matched by raw id, new rows initialized as usual,
resumed phases untouched; on ML-100K + 5% new ratings the warm run reaches the cold run's
validation RMSE in fewer ALS sweeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from svdfill.checkpoint import save_model
from svdfill.config import apply_overrides, load_config
from svdfill.data.idmap import IdMap
from svdfill.errors import UserError
from svdfill.kernels.model import BiasedMF
from svdfill.train.warm_start import warm_start


def _old_run(tmp_path, d=4):
    state = {"user_factors": torch.arange(3 * d, dtype=torch.float32).view(3, d),
             "item_factors": -torch.arange(4 * d, dtype=torch.float32).view(4, d),
             "user_bias": torch.tensor([1., 2, 3]), "item_bias": torch.tensor([-1., -2, -3, -4]),
             "global_mean": torch.tensor(3.0)}
    save_model(tmp_path / "old", state, IdMap(np.array([10, 20, 30]), np.array([1, 2, 3, 4])),
               load_config("ml-100k-als"), {})
    return tmp_path / "old", state


def test_rows_matched_by_raw_id(tmp_path):
    run, old = _old_run(tmp_path)
    new = IdMap(np.array([5, 20, 30, 40]), np.array([2, 4, 9]))  # users 5, 40 and item 9 are new
    m = BiasedMF(4, 3, 4, init_std=0.1, global_mean=3.5, seed=0)
    fresh = {k: v.clone() for k, v in m.state_tensors().items()}
    kept = warm_start(m, str(run), new.to_state(), 0, 3)
    assert kept == {"users": 2, "items": 2}
    assert torch.equal(m.user_factors[1:3], old["user_factors"][1:3])
    assert torch.equal(m.user_bias[1:3], old["user_bias"][1:3])
    assert torch.equal(m.user_factors[[0, 3]], fresh["user_factors"][[0, 3]])  # new: as usual
    assert torch.equal(m.item_factors[:2], old["item_factors"][[1, 3]])
    assert torch.equal(m.item_bias[:2], old["item_bias"][[1, 3]])
    assert torch.equal(m.item_factors[2], fresh["item_factors"][2]) and m.item_bias[2] == 0
    assert float(m.global_mean) == 3.5  # μ of the new data
    # an item shard [1, 3) of the new catalogue: items 4 (old row 3) and 9 (new)
    m2 = BiasedMF(4, 2, 4, init_std=0.1, global_mean=3.5, seed=0, item_offset=1)
    assert warm_start(m2, str(run), new.to_state(), 1, 3) == {"users": 2, "items": 1}
    assert torch.equal(m2.item_factors[0], old["item_factors"][3])


def test_errors(tmp_path):
    run, _ = _old_run(tmp_path)
    new = IdMap(np.array([10]), np.array([1]))
    with pytest.raises(UserError, match="has 4 factors, this run model.factors = 5"):
        warm_start(BiasedMF(1, 1, 5), str(run), new.to_state(), 0, 1)
    with pytest.raises(UserError, match="id map is not known"):
        warm_start(BiasedMF(1, 1, 4), str(run), None, 0, 1)
    from svdfill.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no such run directory"):
        warm_start(BiasedMF(1, 1, 4), str(tmp_path / "nope"), new.to_state(), 0, 1)


def warm_vs_cold(ml100k_path, tmp_path, seed=0):
    """ALS (configs/ml-100k-als.toml) on ML-100K: an old model trained on the data less its
    validation 10% and less 5% of all ratings (the whole of 10 users, the rest at random);
    then the full training data, cold and warm-started from the old model. Returns the
    per-sweep validation RMSE lists ``(cold, warm)`` (the same validation split)."""
    from svdfill.data.split import random_val_mask
    from svdfill.train.run import run_training

    lines = ml100k_path.read_text().splitlines()
    n = len(lines)
    val = random_val_mask(n, 0.1, 0)  # the split the full runs make (dataset order = file order)
    users = np.array([int(x.split("\t")[0]) for x in lines])
    rng = np.random.default_rng(seed)
    new = np.isin(users, rng.choice(np.unique(users), 10, replace=False)) & ~val
    rest = np.flatnonzero(~val & ~new)
    new[rng.choice(rest, int(0.05 * n) - int(new.sum()), replace=False)] = True
    old_f = tmp_path / "old.data"
    old_f.write_text("\n".join(l for l, v, m in zip(lines, val, new) if not v and not m) + "\n")
    cfg = load_config("ml-100k-als")
    run_training(apply_overrides(cfg, {"data.path": str(old_f), "data.val_fraction": 0.0}),
                 tmp_path / "old", quiet=True)

    def curve(name, **over):
        c = apply_overrides(cfg, {"data.path": str(ml100k_path), **over})
        run_training(c, tmp_path / name, quiet=True)
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["val_rmse"] for r in rows]

    return curve("cold"), curve("warm", **{"train.init_from": str(tmp_path / "old")})


def test_warm_start_needs_fewer_sweeps_ml100k(ml100k_path, tmp_path):
    cold, warm = warm_vs_cold(ml100k_path, tmp_path)
    target = min(cold)
    n_cold = cold.index(target) + 1
    n_warm = next((e + 1 for e, r in enumerate(warm) if r <= target), None)
    print(f"cold {['%.4f' % r for r in cold]}\nwarm {['%.4f' % r for r in warm]}\n"
          f"cold best {target:.4f} at sweep {n_cold}; warm reaches it at sweep {n_warm}")
    assert n_warm is not None and n_warm < n_cold
