"""torchrun with 2 gloo processes on 127.0.0.1: training on ML-100K (same run directory and
the same accuracy as one process, resumable at another world size) and the sharded fill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
EPOCHS = 4


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"})
    return env


def torchrun(module: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--rdzv-endpoint=127.0.0.1:0",
           "-m", module, *map(str, args)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return p


def write_config(path: Path, ratings: Path, epochs: int = EPOCHS, extra: str = "") -> Path:
    path.write_text(f"""name = "mp-test"
[data]
path = "{ratings}"
format = "ml-100k"
[model]
factors = 32
init_std = 0.1
[train]
lr = 0.01
lr_decay = 0.96
batch_size = 128
epochs = {epochs}
patience = 0
checkpoint_every = 1
[fill]
k = 10
{extra}""")
    return path


def _ml100k() -> Path:
    from conftest import _data_file

    return _data_file("ml-100k", "u.data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One single-process run and one torchrun W=2 run of the same config (shared by tests)."""
    from svdfill.config import load_config
    from svdfill.train import run_training

    ratings = _ml100k()
    d = tmp_path_factory.mktemp("torchrun")
    cfg_path = write_config(d / "cfg.toml", ratings)
    single = d / "single"
    torch.set_num_threads(1)
    run_training(load_config(cfg_path), single, quiet=True)
    dist = d / "dist"
    p = torchrun("svdfill.launch.torchrun_train", "--config", cfg_path, "--out", dist, "--quiet")
    line = json.loads(p.stdout.strip().splitlines()[-1])
    return {"dir": d, "cfg": cfg_path, "single": single, "dist": dist, "line": line}


@pytest.mark.multiprocess
def test_train_w2_same_run_dir_and_accuracy(trained):
    from svdfill import checkpoint as ck

    single, dist = trained["single"], trained["dist"]
    assert trained["line"]["world_size"] == 2
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(dist) == names(single)  # only rank 0 wrote, and nothing else
    s1 = json.loads((single / ck.SUMMARY_FILE).read_text())
    s2 = json.loads((dist / ck.SUMMARY_FILE).read_text())
    assert s2["world_size"] == 2 and s2["epochs_run"] == s1["epochs_run"] == EPOCHS
    assert s2["n_train"] == s1["n_train"] and s2["n_val"] == s1["n_val"]
    assert abs(s2["val_rmse"] - s1["val_rmse"]) <= 0.005, (s1["val_rmse"], s2["val_rmse"])
    assert s2["val_rmse"] < 0.98  # it learned something
    # complete checkpoints: full item tables, loadable with weights_only
    m = ck.load_model(dist)
    assert m.state["item_factors"].shape == (1682, 32) and m.state["user_factors"].shape == (943, 32)
    assert torch.count_nonzero(m.state["item_bias"]) > 1500  # both shards' rows are trained
    state = ck.load_training_state(dist)
    assert state.world_size == 2 and state.model["item_factors"].shape == (1682, 32)
    rows = [json.loads(x) for x in (dist / ck.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))


@pytest.mark.multiprocess
def test_resume_at_other_world_size(trained, tmp_path):
    """A W=2 checkpoint resumes in one process, and a one-process checkpoint under torchrun
    W=2; both end near the uninterrupted run."""
    from svdfill import checkpoint as ck
    from svdfill.config import apply_overrides, load_config
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit, run_training

    cfg = load_config(trained["cfg"])
    s1 = json.loads((trained["single"] / ck.SUMMARY_FILE).read_text())

    # W=2 → W=1: the torchrun run's epoch-4 checkpoint, continued to epoch 6 in one process
    a = tmp_path / "w2_to_w1"
    a.mkdir()
    for f in (ck.CHECKPOINT_FILE, ck.CONFIG_FILE, ck.METRICS_FILE):
        shutil.copy(trained["dist"] / f, a / f)
    sa = run_training(apply_overrides(cfg, {"train.epochs": EPOCHS + 2}), a, resume=True, quiet=True)
    hist = [json.loads(x) for x in (a / ck.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in hist] == list(range(1, EPOCHS + 3))
    assert sa["world_size"] == 1 and sa["epochs_run"] == EPOCHS + 2
    assert sa["val_rmse"] < s1["val_rmse"]  # two more epochs of the same schedule help

    # W=1 → W=2: a one-process run interrupted after epoch 2 (checkpoint, no model yet)
    b = tmp_path / "w1_to_w2"
    ratings, _ = load_dataset(cfg.data)
    train, val = split(ratings, how=cfg.data.split, fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    ck.save_config_echo(b, cfg)
    fit(apply_overrides(cfg, {"train.epochs": 2}), train, val, run_dir=b, quiet=True)
    assert not (b / ck.MODEL_FILE).exists() and (b / ck.CHECKPOINT_FILE).exists()
    torchrun("svdfill.launch.torchrun_train", "--config", trained["cfg"], "--out", b, "--resume", "--quiet")
    sb = json.loads((b / ck.SUMMARY_FILE).read_text())
    hist = [json.loads(x) for x in (b / ck.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in hist] == list(range(1, EPOCHS + 1))
    assert sb["world_size"] == 2
    assert abs(sb["val_rmse"] - s1["val_rmse"]) <= 0.005


@pytest.mark.multiprocess
def test_als_preset_w2_equals_one_process(tmp_path):
    """The ALS preset under torchrun W=2 (items sharded, the users' normal equations
    all-reduced) trains the model one process trains, up to float summation order."""
    from svdfill import checkpoint as ck
    from svdfill.config import apply_overrides, load_config
    from svdfill.train import run_training

    ratings = _ml100k()
    torch.set_num_threads(1)
    single = tmp_path / "single"
    s1 = run_training(apply_overrides(load_config("ml-100k-als"), {"data.path": str(ratings)}),
                      single, quiet=True)
    dist = tmp_path / "dist"
    torchrun("svdfill.launch.torchrun_train", "--config", "ml-100k-als", "--ratings", ratings,
             "--out", dist, "--quiet")
    s2 = json.loads((dist / ck.SUMMARY_FILE).read_text())
    assert s2["world_size"] == 2 and s2["epochs_run"] == s1["epochs_run"] == 8
    assert abs(s2["val_rmse"] - s1["val_rmse"]) < 1e-4, (s1["val_rmse"], s2["val_rmse"])
    assert s2["val_rmse"] < 0.92
    a, b = ck.load_model(single).state, ck.load_model(dist).state
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3, msg=k)


@pytest.mark.multiprocess
def test_gibbs_preset_w2_fits_as_one_process_and_resumes_in_one(tmp_path):
    """The Gibbs preset (the ML-100K default) under torchrun W=2: users drawn from normal
    equations summed over the item shards, the same on both ranks; other random numbers
    than one process, the same accuracy. A W=2 chain stopped at sweep 10 continues in one
    process from its checkpoint (full item tables of the chain state) to the same place, and
    a one-process chain continues under W=2."""
    from svdfill import checkpoint as ck
    from svdfill.config import apply_overrides, load_config
    from svdfill.train import run_training

    ratings = _ml100k()
    torch.set_num_threads(1)
    cfg = apply_overrides(load_config("ml-100k"), {"data.path": str(ratings)})
    s1 = run_training(cfg, tmp_path / "single", quiet=True)
    torchrun("svdfill.launch.torchrun_train", "--config", "ml-100k", "--ratings", ratings,
             "--out", tmp_path / "dist", "--quiet")
    s2 = json.loads((tmp_path / "dist" / ck.SUMMARY_FILE).read_text())
    assert s2["world_size"] == 2 and s2["epochs_run"] == s1["epochs_run"] == 20
    assert abs(s2["val_rmse"] - s1["val_rmse"]) <= 0.005, (s1["val_rmse"], s2["val_rmse"])

    half = tmp_path / "half"
    torchrun("svdfill.launch.torchrun_train", "--config", "ml-100k", "--ratings", ratings,
             "--out", half, "--epochs", "10", "--quiet")
    state = ck.load_training_state(half)
    assert state.world_size == 2 and state.solver["Q"].shape == (1682, 8)
    assert state.solver["mean.v"].shape[0] == 1682
    on = tmp_path / "w2_to_w1"
    on.mkdir()
    for f in (ck.CHECKPOINT_FILE, ck.CONFIG_FILE, ck.METRICS_FILE):
        shutil.copy(half / f, on / f)
    s3 = run_training(cfg, on, resume=True, quiet=True)
    assert s3["epochs_run"] == 20 and s3["world_size"] == 1
    assert abs(s3["val_rmse"] - s1["val_rmse"]) <= 0.005, (s1["val_rmse"], s3["val_rmse"])
    # and the other way: one process to sweep 10, then torchrun W=2 from its checkpoint
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit

    back = tmp_path / "w1_to_w2"
    train, val = split(load_dataset(cfg.data)[0], how=cfg.data.split,
                       fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    ck.save_config_echo(back, cfg)
    fit(apply_overrides(cfg, {"train.epochs": 10}), train, val, run_dir=back, quiet=True)
    assert not (back / ck.MODEL_FILE).exists() and ck.load_training_state(back).solver
    torchrun("svdfill.launch.torchrun_train", "--config", "ml-100k", "--ratings", ratings,
             "--out", back, "--resume", "--quiet")
    s4 = json.loads((back / ck.SUMMARY_FILE).read_text())
    assert s4["epochs_run"] == 20 and s4["world_size"] == 2
    assert abs(s4["val_rmse"] - s1["val_rmse"]) <= 0.005, (s1["val_rmse"], s4["val_rmse"])


def single_process_fill(model: Path, out: Path, *extra: str) -> None:
    """``svdfill fill`` in this process (the reference output)."""
    import argparse

    from svdfill.launch import cmd_fill

    p = argparse.ArgumentParser()
    cmd_fill.add_arguments(p)
    assert cmd_fill.main(p.parse_args(["--model", str(model), "--out", str(out), "--quiet", *extra])) == 0


def assert_same_fill(a: Path, b: Path) -> None:
    """Same rows, ids and ranks; scores equal up to float32 GEMM rounding of another shape."""
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.schema.equals(tb.schema) and ta.num_rows == tb.num_rows > 0
    for col in ("user_id", "item_id", "rank"):
        assert ta.column(col).equals(tb.column(col)), col
    np.testing.assert_allclose(ta.column("score").to_numpy(), tb.column("score").to_numpy(),
                               rtol=1e-6, atol=1e-6)
    # the file's svdfill metadata (k, model hash, blocks, ...) is the same too
    ma = {k: v for k, v in (ta.schema.metadata or {}).items() if k.startswith(b"svdfill.")}
    mb = {k: v for k, v in (tb.schema.metadata or {}).items() if k.startswith(b"svdfill.")}
    assert ma == mb


@pytest.mark.multiprocess
def test_torchrun_fill_w2_equals_single_process(trained, tmp_path):
    model = trained["dist"]
    ref = tmp_path / "single.parquet"
    single_process_fill(model, ref, "--k", "10", "--user-block", "300")
    got = tmp_path / "torchrun.parquet"
    torchrun("svdfill.launch.torchrun_fill", "--model", model, "--k", "10", "--out", got,
             "--user-block", "300", "--quiet")
    assert_same_fill(got, ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.parquet", "torchrun.parquet"]


# -- `svdfill train|fill --launcher torchrun` ----------------------------------------------

def svdfill_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``svdfill`` CLI in a subprocess, without the loopback variables of ``_env``:
    ``--launcher torchrun`` sets them for its children."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS",
                        "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "svdfill.launch.cli", *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return p


@pytest.mark.multiprocess
def test_cli_launcher_torchrun_train_then_fill(trained, tmp_path):
    """`svdfill train --launcher torchrun` makes the same run directory as the other runs;
    `svdfill fill --launcher torchrun` on it writes the file one-process `svdfill fill` writes."""
    from svdfill import checkpoint as ck

    run = tmp_path / "run"
    p = svdfill_cli("train", "--config", trained["cfg"], "--out", run, "--epochs", "1", "--quiet",
                    "--launcher", "torchrun", "--nproc", "2")
    line = json.loads(p.stdout.strip().splitlines()[-1])  # rank 0's summary line, streamed through
    assert line["world_size"] == 2 and line["epochs_run"] == 1 and line["run_dir"] == str(run)
    assert sorted(x.name for x in run.iterdir()) == sorted(x.name for x in trained["single"].iterdir())
    summary = json.loads((run / ck.SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1

    got = tmp_path / "cli.parquet"
    svdfill_cli("fill", "--model", run, "--k", "10", "--out", got, "--user-block", "300", "--quiet",
                "--launcher=torchrun", "--nproc=2")
    ref = tmp_path / "single.parquet"
    single_process_fill(run, ref, "--k", "10", "--user-block", "300")
    assert_same_fill(got, ref)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cli.parquet", "run", "single.parquet"]


def test_torchrun_fill_without_torchrun_is_the_one_process_fill(trained, tmp_path):
    """`python -m svdfill.launch.torchrun_fill` started without torchrun's environment is a
    world of one: it writes what `svdfill fill` writes."""
    from svdfill.distributed.process_group import TORCHRUN_VARS

    env = {k: v for k, v in _env().items() if k not in TORCHRUN_VARS}
    got, ref = tmp_path / "one.parquet", tmp_path / "ref.parquet"
    cmd = [sys.executable, "-m", "svdfill.launch.torchrun_fill", "--model", str(trained["single"]),
           "--k", "10", "--out", str(got), "--user-block", "300", "--quiet", "--device", "cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    single_process_fill(trained["single"], ref, "--k", "10", "--user-block", "300")
    assert_same_fill(got, ref)


def _cli_parse(*argv: str):
    from svdfill.launch.cli import build_parser

    return build_parser().parse_args(list(argv))


TRAIN_ARGV = ("--config", "my cfg.toml", "--out", "runs/x", "--ratings=-odd.csv", "--dedupe", "mean",
              "--seed", "-3", "--device", "cpu", "--epochs", "2", "--resume", "--overwrite", "--quiet")
FILL_ARGV = ("--model", "runs/x", "--out", "o.parquet", "--k", "7", "--users", "u.txt", "--device", "cpu",
             "--no-exclude-seen", "--dtype", "bfloat16", "--memory-budget-mb", "64", "--user-block", "9",
             "--restart", "--quiet")


@pytest.mark.parametrize("form", [("--launcher", "torchrun"), ("--launcher=torchrun",)])
@pytest.mark.parametrize("command,argv", [("train", TRAIN_ARGV), ("fill", FILL_ARGV),
                                          ("train", ("--config", "c", "--out", "o")),
                                          ("fill", ("--model", "m", "--out", "o", "--exclude-seen"))])
def test_forwarded_argv_round_trips(command, argv, form):
    """The argv given to the torchrun module parses to the same options, minus the launcher."""
    from svdfill.launch import cmd_fill, cmd_train, launcher, torchrun_fill, torchrun_train

    cmd, child = {"train": (cmd_train, torchrun_train), "fill": (cmd_fill, torchrun_fill)}[command]
    args = _cli_parse(command, *argv[:2], *form, "--nproc", "3", *argv[2:])
    assert launcher.launcher_nproc(args) == 3
    fwd = launcher.forwarded_argv(args, cmd.add_arguments)
    assert not any(a.startswith(("--launcher", "--nproc")) for a in fwd), fwd
    back = vars(child.build_parser().parse_args(fwd))
    assert "launcher" not in back and "nproc" not in back and "backend" in back
    back.pop("backend")
    want = {k: v for k, v in vars(args).items() if k not in ("command", "launcher", "nproc")}
    assert back == want
    assert fwd == launcher.forwarded_argv(_cli_parse(command, *argv), cmd.add_arguments)


def test_launcher_torchrun_runs_the_torchrun_module(monkeypatch):
    """`svdfill train|fill --launcher torchrun` runs `python -m torch.distributed.run … -m
    svdfill.launch.torchrun_*` with loopback defaults and returns its exit code."""
    from svdfill.launch import cli, launcher

    calls = []
    monkeypatch.setattr(launcher, "run_forwarding_signals", lambda cmd, env: calls.append((cmd, env)) or 7)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert cli.main(["train", "--config", "demo", "--out", "runs/x", "--launcher", "torchrun"]) == 7
    assert cli.main(["fill", "--model", "runs/x", "--out", "o.parquet", "--k", "3",
                     "--launcher=torchrun", "--nproc=1"]) == 7
    (train_cmd, env), (fill_cmd, _) = calls
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert train_cmd == [*head, "--nproc_per_node=2", "--rdzv-endpoint=127.0.0.1:0",
                         "-m", "svdfill.launch.torchrun_train", "--config=demo", "--out=runs/x"]
    assert fill_cmd == [*head, "--nproc_per_node=1", "--rdzv-endpoint=127.0.0.1:0",
                        "-m", "svdfill.launch.torchrun_fill", "--model=runs/x", "--out=o.parquet", "--k=3"]
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["OMP_NUM_THREADS"] == "5"  # the user's value kept
    if sys.platform.startswith("linux"):
        assert env["GLOO_SOCKET_IFNAME"] == "lo"


def test_torchrun_children_share_the_cores_unless_told(monkeypatch):
    from svdfill.launch.launcher import torchrun_env

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert torchrun_env(env, nproc=1)["OMP_NUM_THREADS"] == "16"
    assert torchrun_env(env, nproc=4)["OMP_NUM_THREADS"] == "4"
    assert torchrun_env(env, nproc=32)["OMP_NUM_THREADS"] == "1"
    assert torchrun_env({**env, "OMP_NUM_THREADS": "3"}, nproc=1)["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("argv,message", [
    (["train", "--config", "demo", "--out", "o", "--launcher", "torchrun", "--nproc", "0"],
     "--nproc must be at least 1, got 0"),
    (["fill", "--model", "m", "--out", "o", "--launcher", "torchrun", "--nproc=-2"],
     "--nproc must be at least 1, got -2"),
    (["train", "--config", "demo", "--out", "o", "--nproc", "2"], "--nproc 2 needs --launcher torchrun"),
    (["fill", "--model", "m", "--out", "o", "--nproc", "2"], "--nproc 2 needs --launcher torchrun"),
    (["fill", "--model", "m", "--out", "o", "--full", "--launcher", "torchrun"],
     "--full is written by one process"),
    (["train", "--config", "no-such-config.toml", "--out", "o", "--launcher", "torchrun"], "no-such-config"),
])
def test_launcher_errors(monkeypatch, capsys, argv, message):
    from svdfill.launch import cli, launcher

    monkeypatch.setattr(launcher, "run_forwarding_signals", lambda *a: pytest.fail("launched"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdfill: error: ") and message in err, err


@pytest.mark.parametrize("module,argv", [
    ("torchrun_train", ["--config", "demo", "--out", "o", "--launcher", "torchrun"]),
    ("torchrun_train", ["--config", "demo", "--out", "o", "--nproc", "2"]),
    ("torchrun_fill", ["--model", "m", "--out", "o", "--launcher=torchrun"]),
    ("torchrun_fill", ["--model", "m", "--out", "o", "--nproc", "3"]),
])
def test_torchrun_modules_have_no_launcher(capsys, module, argv):
    """A rank never relaunches itself: the torchrun entry points do not take --launcher."""
    import importlib

    mod = importlib.import_module(f"svdfill.launch.{module}")
    with pytest.raises(SystemExit) as e:
        mod.build_parser().parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_run_forwarding_signals(tmp_path):
    """SIGTERM sent to the launcher reaches the child, whose exit code is returned; output
    streams through (not captured)."""
    import signal
    import threading
    import time

    from svdfill.launch.launcher import run_forwarding_signals

    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(60)\n")

    def kill_when_ready():
        t0 = time.monotonic()
        while not ready.exists() and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=kill_when_ready)
    t.start()
    t0 = time.monotonic()
    assert run_forwarding_signals([sys.executable, "-c", child]) == 7
    t.join()
    assert time.monotonic() - t0 < 30 and signal.getsignal(signal.SIGTERM) is before
    assert run_forwarding_signals([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == 128 + 9
