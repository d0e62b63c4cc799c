"""bench/fill.py (`svdfill bench fill`): the synthetic seen-item CSR, and one table with
its DataLoader baseline measured in the same run."""

from __future__ import annotations

import argparse

import torch

from svdfill.bench import fill as bench_fill
from svdfill.bench.fill import synthetic_seen


def test_synthetic_seen_rows_sorted_distinct_in_range():
    indptr, indices = synthetic_seen(3000, 70, 60_000, seed=3, chunk=1000)
    assert indptr.dtype == torch.int64 and indices.dtype == torch.int32
    assert indptr[0] == 0 and int(indptr[-1]) == indices.numel()
    assert abs(indices.numel() - 60_000) < 3000
    counts = indptr[1:] - indptr[:-1]
    assert int(counts.max()) <= 70
    rows = torch.repeat_interleave(torch.arange(3000), counts)
    keys = rows * 70 + indices.long()
    assert bool((keys[1:] > keys[:-1]).all())  # sorted within rows, no duplicates
    assert int(indices.min()) >= 0 and int(indices.max()) < 70


def test_bench_fill_prints_one_table(capsys):
    p = argparse.ArgumentParser()
    bench_fill.add_arguments(p)
    assert bench_fill.main(p.parse_args(["--shape", "tiny", "--device", "cpu", "--dataloader-pairs", "5000",
                                         "--peer", "implicit"])) == 0
    out = capsys.readouterr().out
    for row in ("per-pair DataLoader", "dense product + topk", "| fill_topk |", "fill_topk + Parquet export",
                "implicit recommend"):
        assert row in out
    assert "× DataLoader" in out
