"""bench/export.py: `svdfill bench export` prints its table with the single-file baseline
measured in the same run, every partitioned row read back equal to it (real torchrun
processes, gloo on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess


def test_bench_export_table_has_the_baseline_and_both_item_splits(tmp_path):
    out = subprocess.run([sys.executable, "-m", "svdfill.launch.cli", "bench", "export", "--shape", "tiny",
                          "--workers", "2", "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Fill export, shape tiny: 5,000 rows (top-10)")
    base = next(x for x in lines if x.startswith("one process, one file (baseline)"))
    assert base.split()[-2:] == ["1.00", "yes"]
    for split in ("replicate", "shard"):
        row = next(x for x in lines if x.startswith(f"torchrun, a part per rank, items {split}"))
        assert row.split()[-1] == "yes" and row.split()[7] == "2", row  # W = 2, read back equal
    assert sorted(p.name for p in (tmp_path / "torchrun-2-replicate").iterdir()) == [
        "_manifest.json", "part-00000.parquet", "part-00001.parquet"]
