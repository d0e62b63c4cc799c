"""`svdfill train` / `svdfill eval` end to end: run directory contents, refusals, the real
kill -9 → --resume test, eval with unknown ids, clear errors, nothing partial on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from svdfill import checkpoint as ck

TINY = """
name = "tiny"
[data]
path = "{path}"
val_fraction = 0.1
[data.synthetic]
n_users = 400
n_items = 150
n_ratings = {n}
rank = 4
noise = 0.5
[model]
factors = 4
init_std = 0.1
[train]
lr = 0.02
reg_factors = 0.02
batch_size = {batch}
epochs = {epochs}
patience = 0
refit = {refit}
checkpoint_every = 1
"""


def _config(tmp_path: Path, *, path="", n=12_000, epochs=4, batch=128, refit="false", name="c.toml") -> Path:
    p = tmp_path / name
    p.write_text(TINY.format(path=path, n=n, epochs=epochs, batch=batch, refit=refit))
    return p


def _cli(*args, check=True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "svdfill.launch.cli", *map(str, args)],
                       capture_output=True, text=True, env=env, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"rc {r.returncode}\nstdout:{r.stdout}\nstderr:{r.stderr}")
    return r


def _inproc(*args) -> int:
    from svdfill.launch.cli import main

    return main([str(a) for a in args])


def test_seen_sets_without_refit_are_the_training_pairs_and_all_pairs(tmp_path, capsys):
    """seen.pt of a run without refit: "train" = the split's training pairs, "all" = every
    rated pair (the export excludes "all"), both as build_csr of exactly those pairs."""
    from svdfill.config import load_config
    from svdfill.data.csr import build_csr
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split

    cfg = _config(tmp_path, refit="false", epochs=1)
    out = tmp_path / "runs" / "s"
    assert _inproc("train", "--config", cfg, "--out", out, "--quiet") == 0
    c = load_config(cfg)
    ratings, _ = load_dataset(c.data)
    train, val = split(ratings, how=c.data.split, fraction=c.data.val_fraction, seed=c.data.split_seed)
    assert len(val) > 0
    seen = ck.load_seen(out)
    for got, want in ((seen["train"], build_csr(train.users, train.items, ratings.n_users)),
                      (seen["all"], build_csr(ratings.users, ratings.items, ratings.n_users))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    cfg = _config(tmp_path, refit="true")
    out = tmp_path / "runs" / "a"
    assert _inproc("train", "--config", cfg, "--out", out, "--seed", 3, "--quiet") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["run_dir"] == str(out)
    for f in ("model.pt", "seen.pt", "checkpoint.pt", "metrics.jsonl", "summary.json", "config.toml"):
        assert (out / f).exists(), f
    assert not list(out.glob(".*.tmp"))
    s = json.loads((out / "summary.json").read_text())
    for k in ("val_rmse", "val_mae", "val_mse", "best_epoch", "train_seconds", "n_train", "n_val",
              "n_val_cold", "epochs_run", "refit", "device", "seed"):
        assert k in s, k
    assert s["seed"] == 3 and s["device"] == "cpu" and s["refit"]["epochs"] == s["best_epoch"]
    assert s["n_train"] + s["n_val"] == s["refit"]["n_train"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == s["epochs_run"] + s["refit"]["epochs"]
    m = ck.load_model(out)
    assert m.config.train.seed == 3 and m.metrics["val_rmse"] == s["val_rmse"]
    seen = ck.load_seen(out)
    n_all = s["n_train"] + s["n_val"]
    assert int(seen["all"][0][-1]) == n_all and int(seen["train"][0][-1]) == n_all  # refit: all trained
    from svdfill.config import load_config

    assert load_config(out / "config.toml").train.seed == 3


def test_existing_runs_are_refused_unless_resume_or_overwrite(tmp_path, capsys):
    cfg = _config(tmp_path, epochs=2)
    out = tmp_path / "r"
    assert _inproc("train", "--config", cfg, "--out", out, "--quiet") == 0
    capsys.readouterr()
    # same run, no flag → refused, pointing at --resume
    assert _inproc("train", "--config", cfg, "--out", out, "--quiet") == 2
    assert "--resume" in capsys.readouterr().err
    # a different run → refused, naming the difference
    assert _inproc("train", "--config", cfg, "--out", out, "--seed", 9, "--quiet") == 2
    assert "train.seed" in capsys.readouterr().err
    # --resume on a finished run: nothing to do
    assert _inproc("train", "--config", cfg, "--out", out, "--resume") == 0
    assert "already complete" in capsys.readouterr().out
    # --overwrite replaces it
    assert _inproc("train", "--config", cfg, "--out", out, "--seed", 9, "--overwrite", "--quiet") == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 9
    # a folder with foreign files is not a run
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _inproc("train", "--config", cfg, "--out", other, "--quiet") == 2
    assert "holds no svdfill run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_failures_leave_nothing_behind_and_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating\n1,2,3\n1,3,x\n")
    cfg = _config(tmp_path, path=str(bad))
    out = tmp_path / "never"
    assert _inproc("train", "--config", cfg, "--out", out) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and not out.exists()
    # cuda without cuda
    if not torch.cuda.is_available():
        assert _inproc("train", "--config", _config(tmp_path), "--out", out, "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err and not out.exists()
    # unknown config key
    p = tmp_path / "typo.toml"
    p.write_text("[train]\nlearning_rate = 0.1\n")
    assert _inproc("train", "--config", p, "--out", out) == 2
    assert "learning_rate" in capsys.readouterr().err
    # eval of a missing model
    assert _inproc("eval", "--model", tmp_path / "nope", "--ratings", bad) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_scores_a_file_and_predicts_unknown_ids_from_biases(tmp_path, capsys):
    from svdfill.data.dataset import read_raw
    from svdfill.config import load_config

    cfg_path = _config(tmp_path, epochs=3)
    out = tmp_path / "r"
    assert _inproc("train", "--config", cfg_path, "--out", out, "--quiet") == 0
    raw = read_raw(load_config(cfg_path).data)
    lines = ["user,item,rating"] + [f"{u},{i},{r}" for u, i, r in
                                    zip(raw.users[:200], raw.items[:200], raw.ratings[:200])]
    lines += ["999999,%d,4.0" % raw.items[0], "%d,888888,2.0" % raw.users[0], "777777,666666,3.0"]
    f = tmp_path / "test.csv"
    f.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert _inproc("eval", "--model", out, "--ratings", f, "--quiet") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 203 and res["n_cold_users"] == 2 and res["n_cold_items"] == 2
    assert 0 < res["rmse"] < 1.5 and res["mse"] == pytest.approx(res["rmse"] ** 2)
    # the cold predictions: μ + known bias, μ alone for both unknown
    from svdfill.launch.cmd_eval import predict_raw

    m = ck.load_model(out)
    pred, cu, ci = predict_raw(m, [777777, 999999], [666666, int(raw.items[0])])
    mu = float(m.state["global_mean"])
    j = int(m.idmap.encode_items([int(raw.items[0])])[0])
    assert pred[0].item() == pytest.approx(mu)
    assert pred[1].item() == pytest.approx(mu + float(m.state["item_bias"][j]))


def test_kill_9_then_resume_ends_with_the_uninterrupted_metrics(tmp_path):
    """A real `svdfill train` process is SIGKILLed after its first checkpoint; `--resume`
    finishes it, and the result equals an uninterrupted run's to the last digit."""
    cfg = _config(tmp_path, n=30_000, epochs=4, batch=64, refit="true")
    ref = tmp_path / "ref"
    _cli("train", "--config", cfg, "--out", ref, "--quiet", timeout=600)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "svdfill.launch.cli", "train", "--config", str(cfg),
                             "--out", str(run), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    epoch_at_kill = ck.load_training_state(run).epoch
    assert epoch_at_kill < 4
    _cli("train", "--config", cfg, "--out", run, "--resume", "--quiet", timeout=600)
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    for s in (a, b):
        s.pop("train_seconds")
        s["refit"].pop("seconds")
    assert a == b
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(ref) == strip(run)
    ma, mb = ck.load_model(ref), ck.load_model(run)
    for k in ma.state:
        assert torch.equal(ma.state[k], mb.state[k])


def test_dedupe_option_accepts_filmtrust_duplicates(tmp_path, filmtrust_path):
    """FilmTrust's 3 duplicate pairs stop training by default; --dedupe mean accepts them."""
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "svdfill.launch.cli", "train", "--config", "demo",
            "--ratings", str(filmtrust_path), "--epochs", "1", "--quiet"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert bad.returncode == 2 and "duplicate" in bad.stderr.lower(), bad.stderr
    assert not (tmp_path / "a" / "model.pt").exists()
    ok = subprocess.run(base + ["--out", str(tmp_path / "b"), "--dedupe", "mean"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["n_train"] + summary["n_val"] == 35_494
