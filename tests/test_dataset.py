"""data/dataset.py: Ratings container and load_dataset(cfg.data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svdfill.config import DataConfig, SynthConfig
from svdfill.data.dataset import Ratings, encode, load_dataset
from svdfill.data.errors import DataError
from svdfill.data.idmap import IdMap
from svdfill.data.readers import RawRatings


def test_ratings_container():
    r = Ratings.from_arrays([0, 2, 1], [1, 0, 1], [1.0, 2.0, 4.5])
    assert (r.n_users, r.n_items, len(r)) == (3, 2, 3)
    assert r.users.dtype == r.items.dtype == torch.int32 and r.ratings.dtype == torch.float32
    assert r.mean() == pytest.approx(2.5)
    s = r.subset(torch.tensor([2, 0]))
    assert s.users.tolist() == [1, 0] and (s.n_users, s.n_items) == (3, 2)
    assert r.subset(torch.tensor([True, False, True])).ratings.tolist() == [1.0, 4.5]
    both = s.cat(r)
    assert len(both) == 5 and both.items.tolist() == [1, 1, 1, 0, 1]
    assert r.to("cpu") is r
    assert math.isnan(r.subset(torch.zeros(0, dtype=torch.long)).mean())
    with pytest.raises(ValueError):
        Ratings(torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.zeros(3), 1, 1)


def test_encode_with_existing_map_drops_unknown():
    raw = RawRatings(np.array([1, 2, 9]), np.array([5, 6, 5]), np.array([1, 2, 3], np.float32))
    m = IdMap(np.array([1, 2]), np.array([5]))
    r, same = encode(raw, m)
    assert same is m and r.users.tolist() == [0] and r.ratings.tolist() == [1.0]
    r2, m2 = encode(raw)
    assert m2.user_ids.tolist() == [1, 2, 9] and r2.users.tolist() == [0, 1, 2] and r2.items.tolist() == [0, 1, 0]


def test_load_dataset_ml100k(ml100k_path):
    r, m = load_dataset(DataConfig(path=str(ml100k_path)))
    assert (len(r), r.n_users, r.n_items) == (100_000, 943, 1682)
    assert m.decode_users(r.users[:1]).tolist() == [196] and m.decode_items(r.items[:1]).tolist() == [242]
    assert r.mean() == pytest.approx(3.52986, abs=1e-5)


def test_load_dataset_relative_path_and_cfg_options(ml100k_path, tmp_path, monkeypatch):
    # configs use paths relative to the repository root, found from any working directory
    from svdfill.config import PACKAGE_ROOT

    import os
    rel = os.path.relpath(ml100k_path, PACKAGE_ROOT)
    monkeypatch.chdir(tmp_path)
    r, _ = load_dataset(DataConfig(path=rel))
    assert len(r) == 100_000
    with pytest.raises(DataError, match="outside the scale"):
        load_dataset(DataConfig(path=str(ml100k_path), scale_min=2.0))
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\nu1,i1,7\nu1,i1,9\n")
    with pytest.raises(DataError, match="duplicate"):
        load_dataset(DataConfig(path=str(p), user_col="a", item_col="b", rating_col="c"))
    r, m = load_dataset(DataConfig(path=str(p), user_col="a", item_col="b", rating_col="c", dedupe="mean"))
    assert r.ratings.tolist() == [8.0] and m.decode_users([0]).tolist() == ["u1"]


def test_load_dataset_synthetic():
    cfg = DataConfig(path="", synthetic=SynthConfig(n_users=300, n_items=80, n_ratings=5000, seed=2))
    r, m = load_dataset(cfg)
    assert len(r) == 5000 and r.n_users <= 300 and r.n_items <= 80
    assert m.user_dtype == "int64"
    r2, _ = load_dataset(cfg)
    assert torch.equal(r.ratings, r2.ratings)
