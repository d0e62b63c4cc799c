"""`svdfill run`: the README's main job (built-in synthetic preset → train → Parquet)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svdfill.launch.cli", "run", *args],
                          capture_output=True, text=True, timeout=300)


def test_run_trains_then_fills_and_a_rerun_reuses_the_model(tmp_path):
    out = tmp_path / "demo"
    first = _run("--out", str(out), "--epochs", "2", "--k", "7", "--quiet")
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["val_rmse"] < 1.5
    table = pq.read_table(out / "recs.parquet")
    assert table.column_names == ["user_id", "item_id", "score", "rank"]
    n_users = table.column("user_id").to_numpy()
    assert table.num_rows == len(set(n_users.tolist())) * 7
    model_mtime = (out / "model.pt").stat().st_mtime_ns

    again = _run("--out", str(out), "--k", "7")
    assert again.returncode == 0, again.stderr
    assert "already holds a finished run" in again.stdout
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime
    assert pq.read_table(out / "recs.parquet").equals(table)


def test_run_with_an_unknown_preset_is_a_clear_error(tmp_path):
    bad = _run("--config", "no-such-preset", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "no-such-preset" in bad.stderr and "presets:" in bad.stderr
    assert not (tmp_path / "x").exists()
