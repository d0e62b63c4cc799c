"""``ray job submit`` against a local Ray head on 127.0.0.1: Ray Train (2 workers) writes
the same run directory as ``svdfill train``; the Ray-actor fill writes the same Parquet
file as ``svdfill fill`` (and, with ``--out DIR/``, the same rows as a one-part dataset)."""

from __future__ import annotations

import json

import pytest

from ray_helpers import job_submit, shared_head
from test_torchrun import assert_same_fill, single_process_fill, write_config
from tests.s3_server import s3_bucket  # noqa: F401  (fixture)


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

    # --out DIR/: the partitioned dataset, each actor writing its own part (the block ranges
    # of a torchrun export at W = 2), the driver only the manifest, last
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.fill.dataset import read_manifest

    ds = tmp_path / "ray-ds"
    p = job_submit(head, ["python", "-m", "svdfill.launch.ray_job", "fill", "--model", str(out),
                          "--k", "10", "--out", f"{ds}/", "--num-actors", "2", "--user-block", "300"])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert sorted(x.name for x in ds.iterdir()) == ["_manifest.json", "part-00000.parquet",
                                                     "part-00001.parquet"]
    assert pads.dataset(ds, format="parquet").to_table().equals(pq.read_table(got))
    parts = read_manifest(ds)["parts"]
    assert [(x["file"], x["rank"]) for x in parts] == [("part-00000.parquet", 0), ("part-00001.parquet", 1)]
    writers = [x["writer"] for x in parts]
    assert all(w.startswith("ray actor pid ") for w in writers) and len(set(writers)) == 2, writers
    n_blocks = read_manifest(ds)["n_blocks"]
    assert [(x["first_block"], x["last_block"]) for x in parts] == [(0, n_blocks // 2 - 1),
                                                                    (n_blocks // 2, n_blocks - 1)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_with_ray_storage_on_s3(head, tmp_path, ml100k_path, s3_bucket):
    """``--storage-path s3://…`` on a real S3-compatible server (127.0.0.1): Ray Train writes
    its records and the reported checkpoints there, not under OUT/.ray, and the run directory
    is the usual one."""
    import subprocess
    import sys

    import pyarrow.fs as pafs

    from ray_helpers import ray_env
    from svdfill import checkpoint as ck

    bucket, fs = s3_bucket
    cfg = write_config(tmp_path / "cfg.toml", ml100k_path, epochs=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "svdfill.launch.ray_job", "train", "--config", str(cfg),
           "--out", str(out), "--num-workers", "2", "--address", head.gcs_address, "--quiet",
           "--storage-path", f"s3://{bucket}/ray-runs"]
    p = subprocess.run(cmd, env=ray_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert not (out / ".ray").exists()
    assert json.loads((out / ck.SUMMARY_FILE).read_text())["epochs_run"] == 2
    keys = [f.path for f in fs.get_file_info(pafs.FileSelector(f"{bucket}/ray-runs", recursive=True))
            if f.type == pafs.FileType.File]
    snaps = [k for k in keys if k.endswith("checkpoint_manager_snapshot.json")]
    assert snaps, keys
    reported = json.loads(fs.open_input_stream(snaps[0]).read())["checkpoint_results"]
    assert [r["metrics"]["epoch"] for r in reported][-1] == 2
    # the checkpoint itself (the run's resumable state) is in the bucket
    assert any(k.rsplit("/", 1)[-1] == ck.CHECKPOINT_FILE for k in keys), keys


def test_unreachable_storage_is_named_before_ray_starts(tmp_path, ml100k_path, capsys, monkeypatch):
    from svdfill.launch import ray_job

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = write_config(tmp_path / "cfg.toml", ml100k_path, epochs=1)
    rc = ray_job.main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                       "--storage-path", "s3://no-bucket/x?secret_key=hidden"])
    err = capsys.readouterr().err
    assert rc != 0 and "--storage-path s3://no-bucket/x: cannot use this location" in err, err
    assert "hidden" not in err
