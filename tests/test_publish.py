"""Fill exports to an object store (fill/publish.py) on a real S3-compatible server on
127.0.0.1: staged locally, uploaded whole, a dataset's manifest last; the objects equal the
local export; one process and torchrun W = 2."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from svdfill.checkpoint import save_model, save_seen
from svdfill.config import Config
from svdfill.data.idmap import IdMap
from tests.s3_server import s3_bucket  # noqa: F401  (fixture)
from test_torchrun import single_process_fill


@pytest.fixture
def staging(tmp_path, monkeypatch):
    root = tmp_path / "staging"
    monkeypatch.setenv("SVDFILL_STAGING", str(root))
    return root


def _run(root, n_users=90, n_items=37, d=6):
    from svdfill.data.csr import build_csr

    g = torch.Generator().manual_seed(5)
    state = {"user_factors": torch.randn(n_users, d, generator=g),
             "item_factors": torch.randn(n_items, d, generator=g),
             "user_bias": torch.randn(n_users, generator=g), "item_bias": torch.randn(n_items, generator=g),
             "global_mean": torch.tensor(3.0)}
    run = root / "run"
    save_model(run, state, IdMap(np.arange(n_users) * 3, np.arange(n_items) + 1000), Config(), {})
    u = torch.randint(0, n_users, (400,), generator=g)
    i = torch.randint(0, n_items, (400,), generator=g)
    csr = build_csr(u, i, n_users, n_items=n_items)
    save_seen(run, csr, csr)
    return run


def _read_object(fs, path):
    import pyarrow as pa

    with fs.open_input_file(path) as f:
        return pq.read_table(pa.BufferReader(f.read()))


def test_single_file_on_s3_equals_the_local_file(tmp_path, s3_bucket, staging):
    bucket, fs = s3_bucket
    run = _run(tmp_path)
    single_process_fill(run, f"s3://{bucket}/out/recs.parquet", "--k", "5", "--user-block", "20")
    ref = tmp_path / "local.parquet"
    single_process_fill(run, ref, "--k", "5", "--user-block", "20")
    got = _read_object(fs, f"{bucket}/out/recs.parquet")
    assert got.equals(pq.read_table(ref))
    assert got.schema.metadata == pq.read_schema(ref).metadata
    assert not any(staging.rglob("*.parquet"))  # the staging copy is gone once published


def test_dataset_on_s3_parts_then_manifest(tmp_path, s3_bucket, staging, capsys):
    import json

    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from svdfill.launch.errors import UserError

    bucket, fs = s3_bucket
    run = _run(tmp_path)
    # an old manifest and a stale part of an earlier export under the prefix: both replaced/removed
    fs.create_dir(f"{bucket}/recs")
    with fs.open_output_stream(f"{bucket}/recs/_manifest.json") as f:
        f.write(b'{"format": "old"}')
    with fs.open_output_stream(f"{bucket}/recs/part-00003.parquet") as f:
        f.write(b"stale")
    single_process_fill(run, f"s3://{bucket}/recs/", "--k", "4", "--user-block", "25")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/recs")))
    assert names == ["_manifest.json", "part-00000.parquet"]
    manifest = json.loads(fs.open_input_stream(f"{bucket}/recs/_manifest.json").read())
    assert manifest["parts"][0]["rows"] == 90 * 4 and manifest["n_blocks"] == 4
    ref = tmp_path / "local.parquet"
    single_process_fill(run, ref, "--k", "4", "--user-block", "25")
    got = ds.dataset(f"{bucket}/recs", filesystem=fs, format="parquet").to_table()
    assert got.equals(pq.read_table(ref).select(got.column_names))
    assert not any(staging.rglob("*.parquet"))

    # a prefix holding other objects is refused before any work, naming the URI
    with fs.open_output_stream(f"{bucket}/mixed/notes.txt") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=rf"s3://{bucket}/mixed/: holds objects that are not part"):
        single_process_fill(run, f"s3://{bucket}/mixed/", "--k", "4")


@pytest.mark.multiprocess
def test_torchrun_w2_dataset_on_s3(tmp_path, s3_bucket, staging):
    """Each rank uploads its own part; rank 0 the manifest after both."""
    import json

    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from test_torchrun import svdfill_cli

    bucket, fs = s3_bucket
    run = _run(tmp_path)
    svdfill_cli("fill", "--model", run, "--out", f"s3://{bucket}/w2/", "--k", "3", "--user-block", "10",
                "--quiet", "--device", "cpu", "--launcher", "torchrun", "--nproc", "2")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/w2")))
    assert names == ["_manifest.json", "part-00000.parquet", "part-00001.parquet"]
    manifest = json.loads(fs.open_input_stream(f"{bucket}/w2/_manifest.json").read())
    assert [p["rank"] for p in manifest["parts"]] == [0, 1]
    ref = tmp_path / "local.parquet"
    single_process_fill(run, ref, "--k", "3", "--user-block", "10")
    got = ds.dataset(f"{bucket}/w2", filesystem=fs, format="parquet").to_table()
    want = pq.read_table(ref)
    for c in ("user_id", "item_id", "rank"):
        assert got.column(c).to_pylist() == want.column(c).to_pylist(), c
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(),
                               rtol=1e-6, atol=1e-6)
