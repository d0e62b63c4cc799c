"""``ray job submit`` against a local Ray head on 127.0.0.1: Ray Train (2 workers) writes
the same run directory as ``svdfill train``; the Ray-actor fill writes the same Parquet
file as ``svdfill fill`` (and, with ``--out DIR/``, the same rows as a one-part dataset)."""

from __future__ import annotations

import json

import pytest

from ray_helpers import job_submit, shared_head
from test_torchrun import assert_same_fill, single_process_fill, write_config


@pytest.fixture(scope="module")
def head(request):
    return shared_head(request)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_job_submit_train_and_fill(head, tmp_path, ml100k_path):
    from svdfill import checkpoint as ck

    cfg = write_config(tmp_path / "cfg.toml", ml100k_path, epochs=3, extra="[dist]\nthreads_per_worker = 3\n")
    out = tmp_path / "run"
    p = job_submit(head, ["python", "-m", "svdfill.launch.ray_job", "train", "--config", str(cfg),
                          "--out", str(out), "--num-workers", "2", "--quiet"])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "from node 127.0.0.1" in p.stdout  # the job's driver runs on our 127.0.0.1 node
    line = json.loads([x for x in p.stdout.splitlines() if x.startswith('{"val_rmse"')][-1])
    assert line["world_size"] == 2 and line["epochs_run"] == 3
    assert json.loads((out / ck.SUMMARY_FILE).read_text())["torch_threads"] == 3  # dist.threads_per_worker
    names = {x.name for x in out.iterdir() if not x.name.startswith(".")}
    assert names <= set(ck.RUN_FILES)  # what `svdfill train` writes, nothing else
    assert {ck.MODEL_FILE, ck.SEEN_FILE, ck.METRICS_FILE, ck.SUMMARY_FILE, ck.CONFIG_FILE} <= names
    assert (out / ".ray").is_dir()  # RunConfig.storage_path: Ray's checkpoints and records
    m = ck.load_model(out)
    assert m.state["item_factors"].shape[0] == 1682
    rows = [json.loads(x) for x in (out / ck.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]

    got = tmp_path / "ray.parquet"
    p = job_submit(head, ["python", "-m", "svdfill.launch.ray_job", "fill", "--model", str(out),
                          "--k", "10", "--out", str(got), "--num-actors", "2", "--user-block", "300"])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "2 fill actors" in p.stdout
    ref = tmp_path / "single.parquet"
    single_process_fill(out, ref, "--k", "10", "--user-block", "300")
    assert_same_fill(got, ref)

    # --out DIR/: the partitioned dataset, written by the driver as one part plus its manifest
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.fill.dataset import read_manifest

    ds = tmp_path / "ray-ds"
    p = job_submit(head, ["python", "-m", "svdfill.launch.ray_job", "fill", "--model", str(out),
                          "--k", "10", "--out", f"{ds}/", "--num-actors", "2", "--user-block", "300"])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert sorted(x.name for x in ds.iterdir()) == ["_manifest.json", "part-00000.parquet"]
    assert pads.dataset(ds, format="parquet").to_table().equals(pq.read_table(got))
    assert [(x["file"], x["rank"]) for x in read_manifest(ds)["parts"]] == [("part-00000.parquet", 0)]
