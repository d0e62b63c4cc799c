"""fill.export: the export job as a library call (what `svdfill fill`, `svdfill run` and the
fill bench share): top-k and dense output against the whole-catalogue fill, users in file
order, block sizes, metadata, a sharded hook writing the same bytes, and resume after a
failure mid-export. The command line around it: tests/test_cli_fill.py."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from svdfill.data.export import read_export_metadata
from svdfill.data.idmap import IdMap
from svdfill.fill.export import RANK_MAX, default_user_block, export_fill
from svdfill.kernels.fill import score_dense
from test_shard import FULL_USER, I, U, dyadic_state, oracle, seen_csr
from test_sharded_fill import LocalFill

IDMAP = IdMap(1000 + 3 * np.arange(U), np.array([f"m{i:03d}" for i in range(I)], dtype=object))


def rows_by_user(path):
    t = pq.read_table(path).to_pydict()
    out: dict = {}
    for u, i, s, r in zip(t["user_id"], t["item_id"], t["score"], t["rank"]):
        out.setdefault(u, []).append((i, s, r))
    return out, t["user_id"]


def test_default_user_block():
    assert default_user_block(3000, 100, False, 0) == 10_000
    assert default_user_block(3000, 100_000, False, 0) == 64  # at least 64 users
    assert default_user_block(1000, 0, True, 1 << 30) == 4000  # ~4M dense cells
    assert default_user_block(1000, 0, True, 64_000) == 2  # bounded by the budget
    assert default_user_block(10**8, 0, True, 1) == 1


@pytest.mark.parametrize("users", [None, [30, 2, 17, FULL_USER, 0, 3]])
def test_topk_equals_the_whole_catalogue_fill(tmp_path, users):
    st, seen = dyadic_state(), seen_csr()
    out = tmp_path / "r.parquet"
    summary = export_fill(st, IDMAP, out, k=6, seen=seen, users=None if users is None else np.array(users),
                          user_block=4, quiet=True, provenance={"model_sha256": "ab"})
    sel = list(range(U)) if users is None else users
    assert summary["path"] == str(out) and summary["users"] == len(sel) and summary["user_block"] == 4
    assert summary["blocks"] == -(-len(sel) // 4) and summary["resumed_at"] == 0
    assert pq.ParquetFile(out).metadata.num_row_groups == summary["blocks"]
    got, order = rows_by_user(out)
    assert summary["rows_computed"] == len(order)
    assert list(dict.fromkeys(order)) == [IDMAP.user_ids[u] for u in sel if u != FULL_USER]
    ref_s, ref_i = oracle(st, torch.tensor(sel), 6, seen)
    for n, u in enumerate(sel):
        want = [(IDMAP.item_ids[i], float(s), r + 1) for r, (i, s) in enumerate(zip(ref_i[n].tolist(), ref_s[n].tolist()))
                if i >= 0]
        assert got.get(IDMAP.user_ids[u], []) == want
    meta = read_export_metadata(out)
    assert meta["svdfill.k"] == "6" and meta["svdfill.mode"] == "topk" and meta["svdfill.model_sha256"] == "ab"
    assert meta["svdfill.exclude_seen"] == "true" and meta["svdfill.user_block"] == "4"
    assert ("svdfill.users_sha256" in meta) == (users is not None)


def test_full_writes_every_unseen_pair_with_its_score(tmp_path):
    st, seen = dyadic_state(), seen_csr()
    out = tmp_path / "d.parquet"
    summary = export_fill(st, IDMAP, out, k=0, seen=seen, full=True, user_block=6, quiet=True)
    t = pq.read_table(out).to_pydict()
    dense = score_dense(st["user_factors"], st["item_factors"], st["user_bias"], st["item_bias"], 3.5)
    mask = torch.zeros(U, I, dtype=torch.bool)
    for u in range(U):
        mask[u, seen[1][int(seen[0][u]):int(seen[0][u + 1])].long()] = True
    assert len(t["user_id"]) == summary["rows_computed"] == int((~mask).sum())
    uidx = {v: n for n, v in enumerate(IDMAP.user_ids)}
    iidx = {v: n for n, v in enumerate(IDMAP.item_ids)}
    for u, i, s in zip(t["user_id"], t["item_id"], t["score"]):
        assert not mask[uidx[u], iidx[i]] and s == float(dense[uidx[u], iidx[i]])
    assert read_export_metadata(out)["svdfill.mode"] == "full"


def test_k_outside_the_rank_range_is_refused(tmp_path):
    st = dyadic_state()
    for k in (0, I + 1):
        with pytest.raises(ValueError, match=f"outside 1..{min(I, RANK_MAX)}"):
            export_fill(st, IDMAP, tmp_path / "x.parquet", k=k, quiet=True)


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_sharded_hook_writes_the_same_bytes(tmp_path, ahead):
    st, seen = dyadic_state(), seen_csr()
    ref = tmp_path / "one.parquet"
    export_fill(st, IDMAP, ref, k=5, seen=seen, user_block=4, quiet=True)
    f = LocalFill([(0, 3), (3, 3), (3, 20), (20, I)], ahead, block=4)
    f.start(st, seen, k=5, device="cpu", dtype=None, memory_budget=None)
    got = tmp_path / "sharded.parquet"
    export_fill(st, IDMAP, got, k=5, seen=seen, user_block=4, quiet=True, sharded=f)
    assert got.read_bytes() == ref.read_bytes()
    assert {x for what, x in f.log if what == "collect"} == set(range(-(-U // 4)))


def test_full_ignores_the_sharded_hook(tmp_path):
    st = dyadic_state()
    f = LocalFill([(0, I)], 0)
    f.start(st, None, k=3, device="cpu", dtype=None, memory_budget=None)
    export_fill(st, IDMAP, tmp_path / "d.parquet", k=0, full=True, quiet=True, sharded=f)
    assert f.log == []


class FailingAt(LocalFill):
    def __init__(self, shards, fail_at):
        super().__init__(shards, ahead=1, block=4)
        self.fail_at = fail_at

    def collect(self, rows):
        if int(rows[0]) // self.block == self.fail_at:
            raise RuntimeError("shard lost")
        return [sh.topk(rows) for sh in self.items]


def test_a_failed_export_resumes_at_its_first_unfinished_block(tmp_path):
    st, seen = dyadic_state(), seen_csr()
    clean = tmp_path / "clean.parquet"
    export_fill(st, IDMAP, clean, k=5, seen=seen, user_block=4, quiet=True)
    out = tmp_path / "r.parquet"
    bad = FailingAt([(0, 10), (10, I)], fail_at=5)
    bad.start(st, seen, k=5, device="cpu", dtype=None, memory_budget=None)
    with pytest.raises(RuntimeError, match="shard lost"):
        export_fill(st, IDMAP, out, k=5, seen=seen, user_block=4, quiet=True, sharded=bad)
    assert not out.exists() and (tmp_path / ".r.parquet.partial").is_dir()
    good = LocalFill([(0, 10), (10, I)], ahead=2, block=4)
    good.start(st, seen, k=5, device="cpu", dtype=None, memory_budget=None)
    summary = export_fill(st, IDMAP, out, k=5, seen=seen, user_block=4, quiet=True, sharded=good)
    # block 4's write was queued when block 5 failed: cancelled if it had not begun yet
    assert summary["resumed_at"] in (4, 5)
    assert min(x for what, x in good.log) == summary["resumed_at"]  # the rest from the kept parts
    assert out.read_bytes() == clean.read_bytes()
