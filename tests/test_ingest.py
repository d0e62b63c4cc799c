"""distributed/ingest.py: ranks read disjoint shares of a dataset and end with exactly the
ratings, id map and split one process gives each rank's item shard (real gloo groups)."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from svdfill.config import DataConfig
from svdfill.data.errors import DataError
from tests.multiprocess_harness import run_ranks

pytestmark = pytest.mark.multiprocess


def _rank_read(rank: int, world_size: int, data: DataConfig):
    from svdfill.distributed.ingest import read_sharded
    from svdfill.distributed.world import DistWorld

    from svdfill.distributed.ingest import gather_seen

    world = DistWorld(rank, world_size, torch.device("cpu"), "gloo")
    try:
        got = read_sharded(data, world)
    except DataError as e:
        return {"error": str(e)}
    seen = gather_seen(world, got.train, got.val)
    return {"train": [t.numpy().copy() for t in (got.train.users, got.train.items, got.train.ratings)],
            "val": [t.numpy().copy() for t in (got.val.users, got.val.items, got.val.ratings)],
            "users": got.idmap.user_ids, "items": got.idmap.item_ids, "shards": got.shards,
            "parts": got.parts, "bytes": got.bytes_read, "n": got.n_ratings,
            "seen": None if seen is None else [[t.numpy() for t in csr] for csr in seen]}


def _one_process(data: DataConfig, world_size: int):
    """What every rank trained on before: the whole file read, split, cut by item."""
    from svdfill.data.csr import build_csr_pair
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.distributed.sharding import balanced_shards, item_counts

    from svdfill.config import parse_split_time

    ratings, idmap = load_dataset(data)
    cutoff = parse_split_time(data.split_time) if data.split_time != "" else None
    train, val = split(ratings, how=data.split, fraction=data.val_fraction, seed=data.split_seed,
                       cutoff=cutoff)
    shards = balanced_shards(item_counts(train.items, train.n_items), world_size)
    per_rank = []
    for lo, hi in shards:
        pick = lambda r: [t[(r.items >= lo) & (r.items < hi)].numpy() for t in (r.users, r.items, r.ratings)]  # noqa: E731
        per_rank.append((pick(train), pick(val)))
    seen = build_csr_pair(train.users, train.items, val.users, val.items, ratings.n_users)
    return idmap, shards, per_rank, seen


def _rank_read_many(rank: int, world_size: int, datas: list):
    return [_rank_read(rank, world_size, d) for d in datas]


def _check_same_many(datas: list, world_size: int):
    """:func:`_check_same` of several configs with one group of ranks (one spawn)."""
    got = run_ranks(_rank_read_many, world_size, datas, timeout=300)
    return [_check_same(d, world_size, [g[j] for g in got]) for j, d in enumerate(datas)]


def _check_same(data: DataConfig, world_size: int, got=None):
    if got is None:
        got = run_ranks(_rank_read, world_size, data, timeout=180)
    idmap, shards, per_rank, seen = _one_process(data, world_size)
    assert got[0]["seen"] is not None and all(g["seen"] is None for g in got[1:])
    for have, want in zip(got[0]["seen"], seen):
        assert np.array_equal(have[0], want[0].numpy()) and np.array_equal(have[1], want[1].numpy())
    for r, g in enumerate(got):
        assert "error" not in g, g
        assert g["shards"] == shards
        assert np.array_equal(g["users"], idmap.user_ids) and np.array_equal(g["items"], idmap.item_ids)
        for have, want in zip(g["train"] + g["val"], per_rank[r][0] + per_rank[r][1]):
            assert np.array_equal(have, want)
    return got


def _spark_parts(root, n_parts: int, n: int, seed: int, row_group: int = 500):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(300 * 80, size=n, replace=False)
    users, items = pairs // 80 + 1000, pairs % 80
    ratings = rng.integers(1, 6, n).astype(np.float32)
    root.mkdir()
    (root / "_SUCCESS").write_bytes(b"")
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    for j in range(n_parts):
        s = slice(bounds[j], bounds[j + 1])
        pq.write_table(pa.table({"user": users[s], "item": items[s], "rating": ratings[s]}),
                       root / f"part-{j:05d}.parquet", row_group_size=row_group)
    return users, items, ratings


@pytest.mark.parametrize("world_size", [2, 3])
def test_parquet_parts_read_disjointly_match_one_process(tmp_path, world_size):
    _spark_parts(tmp_path / "ds", 5, 6000, seed=world_size)
    data = DataConfig(path=str(tmp_path / "ds"))
    got = _check_same(data, world_size)
    # every rank read something, no part or row group twice, and about 1/W of the bytes
    shares = [set(g["parts"]) for g in got]
    assert all(shares) and sum(len(s) for s in shares) == len(set().union(*shares))
    total = sum(p.stat().st_size for p in (tmp_path / "ds").glob("part-*"))
    assert all(g["bytes"] < 0.8 * total for g in got)


def test_one_big_parquet_file_is_shared_by_row_groups(tmp_path):
    _spark_parts(tmp_path / "ds", 1, 8000, seed=7, row_group=250)
    got = _check_same(DataConfig(path=str(tmp_path / "ds" / "part-00000.parquet")), 2)
    (a,), (b,) = got[0]["parts"], got[1]["parts"]
    assert a.endswith("[row groups 0:16]") and b.endswith("[row groups 16:32]")
    # each rank counts the bytes of its row groups, not the whole file
    size = (tmp_path / "ds" / "part-00000.parquet").stat().st_size
    assert all(0.3 * size < g["bytes"] < 0.7 * size for g in got)


def test_compressed_text_parts_with_string_ids(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    rng = np.random.default_rng(3)
    for j in range(4):
        lines = ["user,item,rating"] + [f"u{rng.integers(0, 40)}_{j}_{k},{rng.integers(0, 30)},{rng.integers(1, 6)}"
                                        for k in range(300)]
        with gzip.open(d / f"part-{j}.csv.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    _check_same(DataConfig(path=str(d / "part-*.csv.gz")), 2)


def test_ml100k_as_one_text_file(ml100k_path):
    _check_same(DataConfig(path=str(ml100k_path), format="ml-100k"), 2)


def test_a_duplicate_across_ranks_raises_the_one_process_error_everywhere(tmp_path):
    users, items, ratings = _spark_parts(tmp_path / "ds", 4, 4000, seed=11)
    # the last part repeats a pair of the first part: the two are read by different ranks
    last = tmp_path / "ds" / "part-00003.parquet"
    t = pq.read_table(last).to_pydict()
    t["user"][5], t["item"][5] = int(users[7]), int(items[7])
    pq.write_table(pa.table(t), last)
    data = DataConfig(path=str(tmp_path / "ds"))
    with pytest.raises(DataError) as e:
        from svdfill.data.dataset import load_dataset

        load_dataset(data)
    got = run_ranks(_rank_read, 2, data, timeout=180)
    assert [g.get("error") for g in got] == [str(e.value)] * 2
    assert f"{last}: row 6" in str(e.value)


def test_a_bad_rating_on_the_second_rank_stops_every_rank(tmp_path):
    _spark_parts(tmp_path / "ds", 4, 4000, seed=12)
    last = tmp_path / "ds" / "part-00003.parquet"
    t = pq.read_table(last).to_pydict()
    t["rating"][9] = float("nan")
    pq.write_table(pa.table(t), last)
    data = DataConfig(path=str(tmp_path / "ds"))
    got = run_ranks(_rank_read, 2, data, timeout=180)
    assert got[0]["error"] == got[1]["error"] and f"{last}: row 10" in got[0]["error"]


def test_unsupported_settings_say_why():
    from svdfill.distributed.ingest import needs_user_pass, supported

    assert supported(DataConfig(path="x")) is None
    assert supported(DataConfig(path="x", split="per_user", dedupe="mean")) is None
    assert "synthetic" in supported(DataConfig())
    assert not needs_user_pass(DataConfig(path="x"))
    assert needs_user_pass(DataConfig(path="x", split="time"))
    assert needs_user_pass(DataConfig(path="x", dedupe="last"))


def test_ml100k_user_splits_per_rank_match_one_process(ml100k_path):
    """per_user and time splits (each user's latest by timestamp, or a global cut-off) drawn
    on the rank that received each user's ratings: exactly the one-process split."""
    datas = [DataConfig(path=str(ml100k_path), format="ml-100k", split=split, split_time=when,
                        val_fraction=0.15, split_seed=4)
             for split, when in [("per_user", ""), ("time", ""), ("time", "1998-01-01")]]
    for got in _check_same_many(datas, 3):
        assert all(g["n"] == 100_000 for g in got)


def test_duplicates_resolved_per_rank_match_one_process(tmp_path):
    """data.dedupe = last | mean with duplicates spread over the ranks' shares (and a pair
    repeated three times): the survivors, their positions in the deduplicated dataset and
    so the split equal one process's."""
    d = tmp_path / "dups"
    d.mkdir()
    rng = np.random.default_rng(8)
    rows = [(int(rng.integers(0, 50)), int(rng.integers(0, 30)), int(rng.integers(1, 6)),
             int(rng.integers(0, 1000))) for _ in range(2400)]
    rows += [rows[5], rows[5], rows[1200], rows[-1]]  # repeats, later in the file
    rows = [(u, i, r if k % 7 else 5 - r + 1, t) for k, (u, i, r, t) in enumerate(rows)]
    for j, chunk in enumerate(np.array_split(np.arange(len(rows)), 3)):
        (d / f"part-{j}.csv").write_text("user,item,rating,timestamp\n" + "".join(
            f"{rows[k][0]},{rows[k][1]},{rows[k][2]},{rows[k][3]}\n" for k in chunk))
    from svdfill.data.dataset import load_dataset

    datas = [DataConfig(path=str(d), dedupe=dedupe, split=split, val_fraction=0.2, split_seed=1)
             for dedupe, split in [("last", "random"), ("mean", "per_user"), ("mean", "time")]]
    for data, got in zip(datas, _check_same_many(datas, 2)):
        n_one = len(load_dataset(data)[0])
        assert n_one < len(rows) and all(g["n"] == n_one for g in got)
