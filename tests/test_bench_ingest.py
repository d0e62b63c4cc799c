"""bench/ingest.py: `svdfill bench ingest` prints its table with the one-process baseline
measured in the same run (real processes, gloo on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.multiprocess


def test_bench_ingest_table_has_the_baseline_and_each_world_size(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "ds"
    d.mkdir()
    for j in range(4):
        pairs = rng.choice(200 * 50, 1000, replace=False) + j * 200 * 50
        pq.write_table(pa.table({"user": pairs // 50, "item": pairs % 50,
                                 "rating": rng.integers(1, 6, 1000).astype(np.float32)}),
                       d / f"part-{j}.parquet")
    out = subprocess.run([sys.executable, "-m", "svdfill.launch.cli", "bench", "ingest",
                          "--ratings", str(d), "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"Ingest of {d}: 4,000 ratings")
    base = next(x for x in lines if x.startswith("one process reads all"))
    two = next(x for x in lines if x.startswith("each rank its share (2 ranks)"))
    assert base.split()[-1] == "1.00"
    # each of 2 ranks keeps about half the ratings (its item shard) and reads about half
    kept = int(two.split()[8].replace(",", ""))  # how, W, seconds, then ratings kept
    assert 1000 < kept < 3000
