"""bench.kernels: without CUDA it says so and exits 0; --smoke runs the whole table
through Triton's interpreter on tiny shapes and writes one JSON line per figure."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from svdfill.bench import kernels as bench_kernels


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_explains_and_exits_zero(capsys):
    assert bench_kernels.main(_args()) == 0
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out or "triton is not installed" in out


def test_unknown_shape_is_a_user_error():
    from svdfill.launch.errors import UserError

    pytest.importorskip("triton", reason="triton is not installed")
    with pytest.raises(UserError, match="unknown shape"):
        bench_kernels.main(_args("--smoke", "--shapes", "fill-2m"))


def test_smoke_writes_every_figure(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]')")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "figures.jsonl"
    rc = bench_kernels.main(_args("--smoke", "--shapes", "train-ml1m,fill-1m", "--epochs", "1",
                                  "--repeat", "1", "--fill-dtypes", "float32", "--quiet",
                                  "--out", str(out)))
    assert rc == 0
    import os

    assert "TRITON_INTERPRET" not in os.environ  # restored for the rest of the process
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {(r["shape"], r["impl"].split(" (")[0].split(":")[0]) for r in rows}
    assert {("train-ml1m", "floor"), ("train-ml1m", "torch sgd_step"), ("train-ml1m", "fused"),
            ("fill-1m", "torch fill_topk tiles"), ("fill-1m", "fused fill")} <= impls
    for r in rows:
        assert r["smoke"] is True and r["time_s"] > 0 and r["ratio_to_floor"] > 0
    train = [r for r in rows if r["shape"] == "train-ml1m" and "val_rmse" in r]
    assert len(train) == 8 and all(math.isfinite(r["val_rmse"]) for r in train)
    # the lazy-Adam paths are one algorithm, and so are the Adagrad ones: same RMSE from the
    # same init and orders
    for opt, n in (("sparse_adam", 3), ("adagrad", 2)):
        got = [r["val_rmse"] for r in train if r["optimizer"] == opt]
        assert len(got) == n and max(got) - min(got) < 1e-5, (opt, got)
    fused_fill = [r for r in rows if r["impl"].startswith("fused fill")]
    assert fused_fill and fused_fill[0]["rows_identical_to_torch"] == 1.0
    assert "fused fill (float32)" in capsys.readouterr().out  # the table
