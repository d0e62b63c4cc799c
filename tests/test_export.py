"""data.export: the resumable atomic Parquet writer and the block tables (real Parquet files).
The kill -9 of a whole export is in tests/test_cli_fill.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svdfill.data.export import (ExportError, RawIds, ResumableParquetWriter, check_disk_space, check_writable,
                                 read_export_metadata, topk_schema, topk_table)
from svdfill.data.idmap import IdMap

IDMAP = IdMap(np.array([10, 20, 30, 40]), np.array(["a", "b", "c", "d", "e"], dtype=object))
META = {"svdfill.k": "3", "svdfill.model_sha256": "0" * 64}


def block(b: int) -> pa.Table:
    rng = np.random.default_rng(b)
    users = np.array([b % 4, (b + 1) % 4])
    items = np.stack([rng.permutation(5)[:3] for _ in users])
    items[1, 2] = -1  # padding at the end of a row
    scores = np.sort(rng.random(items.shape).astype(np.float32), axis=1)[:, ::-1].copy()
    return topk_table(users, items, scores, RawIds(IDMAP.user_ids), RawIds(IDMAP.item_ids),
                      topk_schema(IDMAP, META))


def write_all(path, n=5, params=None, **kw):
    w = ResumableParquetWriter(path, topk_schema(IDMAP, META), params or {"k": 3}, n, **kw)
    w.open()
    for b in range(w.first_block, n):
        w.write_block(b, block(b))
    return w.finish()


def test_topk_table_drops_padding_and_ranks_from_one():
    t = block(0).to_pydict()
    assert len(t["user_id"]) == 5
    assert t["rank"] == [1, 2, 3, 1, 2]
    assert t["user_id"][:3] == [10, 10, 10] and t["user_id"][3:] == [20, 20]
    assert all(isinstance(i, str) for i in t["item_id"])
    assert block(0).schema.field("rank").type == pa.int16()


def test_one_row_group_per_block_zstd_metadata_and_no_leftovers(tmp_path):
    out = write_all(tmp_path / "r.parquet")
    f = pq.ParquetFile(out)
    assert f.metadata.num_row_groups == 5
    assert f.metadata.row_group(2).column(2).compression == "ZSTD"
    assert f.read().equals(pa.concat_tables([block(b) for b in range(5)]).replace_schema_metadata(f.schema_arrow.metadata))
    assert read_export_metadata(out) == META
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]


def test_interrupted_writer_resumes_to_identical_bytes(tmp_path):
    clean = write_all(tmp_path / "clean.parquet")
    target = tmp_path / "r.parquet"
    w = ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3}, 5)
    w.open()
    for b in range(3):
        w.write_block(b, block(b))
    w.abort()  # the process dies here; parts 0..2 stay
    assert not target.exists()
    w2 = ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3}, 5)
    assert w2.first_block == 3
    replayed = []
    w2.open(on_replayed=replayed.append)
    assert replayed == [0, 1, 2]
    with pytest.raises(ValueError, match="out of order"):
        w2.write_block(4, block(4))
    for b in (3, 4):
        w2.write_block(b, block(b))
    w2.finish()
    assert target.read_bytes() == clean.read_bytes()


def test_existing_target_is_replaced_only_at_the_end(tmp_path):
    target = tmp_path / "r.parquet"
    target.write_bytes(b"old")
    w = ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3}, 2)
    w.open()
    w.write_block(0, block(0))
    assert target.read_bytes() == b"old"
    w.write_block(1, block(1))
    w.finish()
    assert pq.read_table(target).num_rows == 10


def test_other_parameters_refuse_resume_unless_restart(tmp_path):
    target = tmp_path / "r.parquet"
    w = ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3, "model": "x"}, 5)
    w.open()
    w.write_block(0, block(0))
    w.abort()
    with pytest.raises(ExportError, match=r"differs in: k.*--restart"):
        ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 4, "model": "x"}, 5)
    with pytest.raises(ExportError, match="n_blocks"):
        ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3, "model": "x"}, 6)
    w = ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 4, "model": "x"}, 5, restart=True)
    assert w.first_block == 0


def test_unreadable_partial_folder_is_refused(tmp_path):
    target = tmp_path / "r.parquet"
    partial = tmp_path / ".r.parquet.partial"
    partial.mkdir()
    (partial / "params.json").write_text("{not json")
    with pytest.raises(ExportError, match="--restart"):
        ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3}, 5)
    (partial / "params.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ExportError):
        ResumableParquetWriter(target, topk_schema(IDMAP, META), {"k": 3}, 5)


def test_schema_mismatch_is_rejected(tmp_path):
    w = ResumableParquetWriter(tmp_path / "r.parquet", topk_schema(IDMAP, META), {"k": 3}, 1)
    w.open()
    bad = pa.table({"user_id": [1], "item_id": [2]})
    with pytest.raises(ValueError, match="schema"):
        w.write_block(0, bad)
    w.abort()


def test_disk_space_and_writability_checks(tmp_path):
    check_disk_space(tmp_path, 1, "x")
    with pytest.raises(ExportError, match=r"needs about .* free"):
        check_disk_space(tmp_path, 1 << 62, "the dense fill")
    with pytest.raises(ExportError, match="does not exist"):
        check_writable(tmp_path / "nope" / "r.parquet")
    with pytest.raises(ExportError, match="is a directory"):
        check_writable(tmp_path)
