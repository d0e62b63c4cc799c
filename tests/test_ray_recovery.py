"""Ray Train fault tolerance: SIGKILL one training worker mid-run; with
FailureConfig(max_failures) Ray restarts the worker group, which resumes from the last
reported checkpoint and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ray_helpers import ray_env, shared_head
from test_torchrun import write_config

EPOCHS = 8


@pytest.fixture(scope="module")
def head(request):
    return shared_head(request)


def _train_worker_pids(head) -> list[int]:
    """Pids of the live Ray Train workers of this head. The state API can still list actors
    of a finished run as ALIVE for a moment, so only pids that are running processes of our
    node and titled as a RayTrainWorker count: we never signal anything else."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    ours = head.alive()
    pids = []
    for a in actors:
        try:
            with open(f"/proc/{a.pid}/cmdline", "rb") as f:
                title = f.read()
        except (OSError, TypeError):
            continue
        if a.pid in ours and b"RayTrainWorker" in title:
            pids.append(a.pid)
    return pids


def _registered_checkpoints(out) -> int:
    for snap in out.glob(".ray/*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snap.read_text())["checkpoint_results"])
        except (ValueError, KeyError, OSError):
            return 0  # being rewritten
    return 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(head, tmp_path, ml100k_path):
    from svdfill import checkpoint as ck

    cfg = write_config(tmp_path / "cfg.toml", ml100k_path, epochs=EPOCHS)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "svdfill.launch.ray_job", "train", "--config", str(cfg),
           "--out", str(out), "--num-workers", "2", "--max-failures", "2",
           "--address", head.gcs_address, "--quiet"]
    log = tmp_path / "driver.log"  # the whole driver output, for a failed assertion's reader
    proc = subprocess.Popen(cmd, env=ray_env(OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0"),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        # kill only once Ray has *registered* a checkpoint (every worker reported it): a
        # checkpoint folder alone may be one that a restart would rightly not use
        while _registered_checkpoints(out) < 1:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.3)
        pids = _train_worker_pids(head)
        while len(pids) != 2:
            assert time.monotonic() < deadline, f"expected 2 live train workers, found {pids}"
            time.sleep(0.5)
            pids = _train_worker_pids(head)
        victim = pids[-1]
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    keys = [x for x in text.splitlines() if any(w in x for w in ("FailurePolicy", "restarted", "Error count"))]
    assert proc.returncode == 0, text[-6000:]
    assert any("[FailurePolicy] RETRY" in x for x in keys), f"no restart in {log}:\n" + "\n".join(keys)
    # Resumed, not started over: after the restart every report says which checkpoint epoch
    # it resumed from (Ray keeps them in its snapshot in RunConfig.storage_path), and the
    # epochs it registered never go back.
    snap = json.loads(next(out.glob(".ray/*/checkpoint_manager_snapshot.json")).read_text())
    reports = [c["metrics"] for c in snap["checkpoint_results"]]
    epochs = [r["epoch"] for r in reports]
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS, (epochs, keys)
    resumed = reports[-1]["resumed_from_epoch"]
    assert 1 <= resumed < EPOCHS, (reports[-1], keys)
    assert all(r["resumed_from_epoch"] == resumed for r in reports if r["epoch"] > resumed)
    summary = json.loads((out / ck.SUMMARY_FILE).read_text())
    assert summary["epochs_run"] == EPOCHS and summary["world_size"] == 2
    # dist.threads_per_worker = 0: the node's cores shared by its 2 workers, not Ray's 1
    assert summary["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    rows = [json.loads(x) for x in (out / ck.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for f in (ck.MODEL_FILE, ck.SEEN_FILE, ck.CONFIG_FILE):
        assert (out / f).exists()
    assert victim not in _train_worker_pids(head)
