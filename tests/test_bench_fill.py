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
                                         "--peer", "implicit", "--profile-users", "200"])) == 0
    out = capsys.readouterr().out
    for row in ("per-pair DataLoader", "dense product + topk", "| fill_topk |", "fill_topk + Parquet export",
                "implicit recommend"):
        assert row in out
    assert "× DataLoader" in out
    # the per-phase profile, both selections timed on the same tiles
    for phase in ("GEMM", "seen mask, numpy (now)", "numpy threshold (now)", "torch tile_topk (before)"):
        assert phase in out


def test_profile_fill_phases_cover_the_loop():
    state = bench_fill.synthetic_model(300, 200, 4, seed=1)
    seen = synthetic_seen(300, 200, 3000, seed=2)
    prof = bench_fill.profile_fill(state, seen, 10, 250)
    assert [p[0] for p in prof][:3] == ["GEMM [P_B, 1]·[Q, b]ᵀ", "μ + b_u add", "seen mask, numpy (now)"]
    assert all(w >= 0 and c >= 0 for _, w, c in prof) and len(prof) == 6
