"""The device-check scripts under .ci/ run on the GPU machine only when a task is lent one;
this keeps them from rotting in between: the end-to-end script on the demo preset, CPU,
torchrun engine (the Ray engine is covered by tests/test_ray_job.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_e2e_script_runs_the_job_and_reports_each_phase(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CONFIG="demo", CONFIG_ALS="demo", DEVICE="cpu",
               SIGMA="0.5", PY=sys.executable, TMPDIR=str(tmp_path))
    res = subprocess.run(["bash", str(ROOT / ".ci" / "e2e-600k.sh"), "torchrun", "als"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = (tmp_path / "e2e.txt").read_text()
    for engine in ("torchrun", "als"):
        for phase in ("train  rc=0", "fill   rc=0", "total"):
            assert f"{engine:<9} {phase}" in report, report
        assert (tmp_path / f"summary-{engine}.json").exists()
        assert not (tmp_path / f"e2e-{engine}").exists()  # the run is removed once reported
    assert report.count("val RMSE") == 2 and "rows in 1 row groups" in report, report
    # both jobs read one generated data set (same [data.synthetic]): made once, then removed
    assert report.count("data      synth-") == 1 and " rc=0" in report, report
    assert not list(tmp_path.glob("e2e-data-*.parquet"))


def test_device_checks_script_parses_and_names_existing_tests():
    """The one-call GPU script: valid bash, and every test file it runs exists (a renamed
    module would otherwise be found missing only on the device, in its scarce minutes)."""
    import re

    script = ROOT / ".ci" / "device-checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = re.findall(r"tests/test_\w+\.py", script.read_text())
    assert len(named) >= 5
    missing = [n for n in named if not (ROOT / n).exists()]
    assert not missing, missing


@pytest.mark.multiprocess
def test_device_checks_return_few_files_and_every_log(tmp_path):
    """A device call returns at most 8 files from $OUT: the script keeps a fixed few there
    (summary, figures, one archive of every log), refreshed after each stage. Here the CUDA
    tests stage runs on the CPU, where each of its tests skips."""
    import tarfile

    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, OUT=str(out), LOGS=str(logs),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["bash", str(ROOT / ".ci" / "device-checks.sh"), "tests"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["logs.tgz", "summary.txt"], returned
    summary = (out / "summary.txt").read_text()
    assert "stages: tests" in summary and "== tests" in summary, summary
    assert "   rc=0 in" in summary and "skipped" in summary, summary
    with tarfile.open(out / "logs.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"summary.txt", "tests.log"} <= names, names

    bad = subprocess.run(["bash", str(ROOT / ".ci" / "device-checks.sh"), "benchmark"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage 'benchmark'" in bad.stderr, bad.stderr
