"""The grid layout under Ray (a local Ray head on 127.0.0.1): Ray Train with 2 workers
trains the grid ALS model the one-process run trains (equal to float rounding), and
``ray_job fill`` fills it with 2 Ray Train workers running the ring fill, each writing its
own part: the rows of the one-process grid fill."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ray_helpers import ray_env, shared_head
from test_torchrun import write_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

GRID_ALS = """[train]
solver = "als"
reg_factors = 0.85
reg_bias = 4.0
epochs = 3
[train.als]
reg_exponent = 0.6
[dist]
layout = "grid"
"""


@pytest.fixture(scope="module")
def head(request):
    return shared_head(request)


def _cfg(tmp_path, ml100k_path):
    cfg = write_config(tmp_path / "cfg.toml", ml100k_path, epochs=3)
    # the [train] of write_config is SGD's: the ALS grid recipe replaces it
    text = cfg.read_text()
    cfg.write_text(text[:text.index("[train]")] + text[text.index("[fill]"):] + GRID_ALS)
    return cfg


def test_ray_train_and_fill_on_the_grid(head, tmp_path, ml100k_path):
    import pyarrow.dataset as pads

    from svdfill.fill.dataset import read_manifest
    from svdfill.launch import cmd_fill
    from svdfill.launch.cli import main as cli
    from test_cli_fill import parse

    cfg = _cfg(tmp_path, ml100k_path)
    one, ray_run = tmp_path / "one", tmp_path / "ray"
    assert cli(["train", "--config", str(cfg), "--out", str(one), "--quiet"]) == 0
    env = ray_env(OMP_NUM_THREADS="1")
    ray_job = [sys.executable, "-m", "svdfill.launch.ray_job"]
    p = subprocess.run(ray_job + ["train", "--config", str(cfg), "--out", str(ray_run), "--num-workers", "2",
                                  "--address", head.gcs_address, "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    line = json.loads([x for x in p.stdout.splitlines() if x.startswith('{"val_rmse"')][-1])
    assert line["world_size"] == 2
    assert (ray_run / "grid_model" / "layout.json").is_file()
    ref_rmse = json.loads((one / "summary.json").read_text())["val_rmse"]
    assert abs(line["val_rmse"] - ref_rmse) < 1e-6, (line["val_rmse"], ref_rmse)

    # the fill: 2 Ray Train workers around the ring, a part each, the manifest last
    p = subprocess.run(ray_job + ["fill", "--model", str(ray_run), "--k", "10", "--user-block", "200",
                                  "--out", f"{tmp_path / 'ds'}/", "--num-actors", "2",
                                  "--address", head.gcs_address],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "2 part(s) by 2 Ray Train workers" in p.stdout, p.stdout[-2000:]
    assert cmd_fill.main(parse("--model", str(ray_run), "--k", "10", "--user-block", "200", "--quiet",
                               "--out", f"{tmp_path / 'ds1'}/")) == 0
    got = pads.dataset(tmp_path / "ds", format="parquet").to_table()
    ref = pads.dataset(tmp_path / "ds1", format="parquet").to_table()
    assert got.num_rows == ref.num_rows == 943 * 10 and got.equals(ref)
    assert [x["rank"] for x in read_manifest(tmp_path / "ds")["parts"]] == [0, 1]

    # a single file is refused before Ray starts anything
    p = subprocess.run(ray_job + ["fill", "--model", str(ray_run), "--out", str(tmp_path / "one.parquet"),
                                  "--address", head.gcs_address],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "a grid model fills into a local dataset folder" in p.stderr
