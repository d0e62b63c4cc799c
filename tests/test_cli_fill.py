"""`svdfill fill` end to end on real run directories: results vs a float64 brute force with
raw ids, --users, --full, kill -9 and resume (byte-identical file), and every bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from svdfill.checkpoint import load_model, save_model, save_seen
from svdfill.config import Config
from svdfill.data.export import ExportError, read_export_metadata
from svdfill.data.idmap import IdMap
from svdfill.launch import cmd_fill
from svdfill.launch.errors import run_reporting_errors


def make_run(root: Path, n_users=50, n_items=40, *, str_items=True, seed=0, seen_p=0.3,
             cfg: Config | None = None) -> Path:
    """A run directory with dyadic weights (exact float32 scores), raw ids that differ from
    contiguous ids (users 1000, 1003, …; items 'm000', … or 500, 507, …) and seen sets."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    state = {
        "user_factors": torch.from_numpy(rng.integers(-2, 3, (n_users, 4)).astype(np.float32)),
        "item_factors": torch.from_numpy(rng.integers(-2, 3, (n_items, 4)).astype(np.float32)),
        "user_bias": torch.from_numpy((rng.integers(-4, 5, n_users) / 4).astype(np.float32)),
        "item_bias": torch.from_numpy((rng.integers(-4, 5, n_items) / 4).astype(np.float32)),
        "global_mean": torch.tensor(3.5),
    }
    users = 1000 + 3 * np.arange(n_users)
    items = (np.array([f"m{i:03d}" for i in range(n_items)], dtype=object) if str_items
             else 500 + 7 * np.arange(n_items))
    save_model(run, state, IdMap(users, items), cfg or Config(), {})
    mask = rng.random((n_users, n_items)) < seen_p
    mask[0] = True  # a user who has seen everything
    train = mask & (rng.random(mask.shape) < 0.8)

    def csr(m):
        return (np.concatenate([[0], np.cumsum(m.sum(1))]).astype(np.int64),
                np.nonzero(m)[1].astype(np.int32))

    save_seen(run, csr(train), csr(mask))
    np.save(root / "seen_mask.npy", mask)
    return run


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd_fill.add_arguments(p)
    return p.parse_args(list(argv))


def fill(*argv: str) -> int:
    return run_reporting_errors(lambda: cmd_fill.main(parse(*argv)))


def reference(run: Path, k: int, mask: np.ndarray | None):
    m = load_model(run)
    s = {n: t.double().numpy() for n, t in m.state.items()}
    S = s["user_factors"] @ s["item_factors"].T + s["item_bias"] + s["user_bias"][:, None] + float(s["global_mean"])
    if mask is not None:
        S[mask] = -np.inf
    rows = []
    for u in range(S.shape[0]):
        order = np.lexsort((np.arange(S.shape[1]), -S[u]))[:k]
        order = order[np.isfinite(S[u, order])]
        for r, i in enumerate(order, 1):
            rows.append((m.idmap.user_ids[u], m.idmap.item_ids[i], S[u, i], r))
    return rows


def rows_of(path: Path):
    t = pq.read_table(path).to_pydict()
    return list(zip(t["user_id"], t["item_id"], t["score"], t["rank"]))


def test_topk_export_equals_brute_force_with_raw_ids(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "recs.parquet"
    assert fill("--model", str(run), "--k", "7", "--out", str(out), "--user-block", "8", "--quiet") == 0
    mask = np.load(tmp_path / "seen_mask.npy")
    got, ref = rows_of(out), reference(run, 7, mask)
    assert [(u, i, r) for u, i, _, r in got] == [(u, i, r) for u, i, _, r in ref]
    np.testing.assert_array_equal(np.array([g[2] for g in got]), np.array([r[2] for r in ref], dtype=np.float32))
    f = pq.ParquetFile(out)
    schema = f.schema_arrow
    assert [str(schema.field(n).type) for n in ("user_id", "item_id", "score", "rank")] == \
        ["int64", "string", "float", "int16"]
    assert f.metadata.num_row_groups == 7  # 50 users / 8 per block
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    md = read_export_metadata(out)
    assert md["svdfill.k"] == "7" and md["svdfill.exclude_seen"] == "true"
    assert len(md["svdfill.model_sha256"]) == 64 and md["svdfill.user_block"] == "8"
    assert md["svdfill.version"]
    assert not any(p.name.startswith(".recs") for p in tmp_path.iterdir())  # no leftovers


def test_no_exclude_seen_and_int_item_ids(tmp_path):
    run = make_run(tmp_path, str_items=False)
    out = tmp_path / "all.parquet"
    assert fill("--model", str(run / "model.pt"), "--k", "5", "--out", str(out), "--no-exclude-seen",
                "--quiet") == 0
    got = rows_of(out)
    assert [(u, i, r) for u, i, _, r in got] == [(u, i, r) for u, i, _, r in reference(run, 5, None)]
    assert str(pq.read_schema(out).field("item_id").type) == "int64"
    assert read_export_metadata(out)["svdfill.exclude_seen"] == "false"


def test_users_file_in_file_order(tmp_path, capsys):
    run = make_run(tmp_path)
    users = tmp_path / "users.txt"
    users.write_text("# wanted\n1009\n\n1000\n1003\n1009\n")
    out = tmp_path / "some.parquet"
    assert fill("--model", str(run), "--k", "3", "--out", str(out), "--users", str(users), "--quiet") == 0
    assert "duplicate" in capsys.readouterr().err
    t = pq.read_table(out).to_pydict()
    # user 1000 has seen everything: no rows; others in file order
    assert t["user_id"] == [1009] * 3 + [1003] * 3
    ref = {(u, i, r) for u, i, _, r in reference(run, 3, np.load(tmp_path / "seen_mask.npy"))}
    assert set(zip(t["user_id"], t["item_id"], t["rank"])) <= ref


def test_full_dense_export(tmp_path):
    run = make_run(tmp_path, n_users=13, n_items=9)
    out = tmp_path / "dense.parquet"
    assert fill("--model", str(run), "--full", "--out", str(out), "--user-block", "4", "--quiet") == 0
    mask = np.load(tmp_path / "seen_mask.npy")
    m = load_model(run)
    t = pq.read_table(out)
    assert t.column_names == ["user_id", "item_id", "score"]
    assert t.num_rows == mask.size - mask.sum()
    s = {n: x.double().numpy() for n, x in m.state.items()}
    S = s["user_factors"] @ s["item_factors"].T + s["item_bias"] + s["user_bias"][:, None] + float(s["global_mean"])
    u, i = np.nonzero(~mask)  # row-major: user then item ascending, as written
    d = t.to_pydict()
    assert d["user_id"] == list(m.idmap.user_ids[u]) and d["item_id"] == list(m.idmap.item_ids[i])
    np.testing.assert_array_equal(np.array(d["score"]), S[u, i].astype(np.float32))
    assert pq.ParquetFile(out).metadata.num_row_groups == 4
    assert read_export_metadata(out)["svdfill.mode"] == "full"


def test_full_refuses_without_disk_space(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "dense.parquet"
    assert fill("--model", str(run), "--full", "--out", str(out), "--quiet") == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "needs about" in err and "free" in err
    assert not out.exists()


KILL_SCRIPT = """
import sys
from svdfill.launch import cmd_fill
from svdfill.launch.errors import run_reporting_errors
import argparse
p = argparse.ArgumentParser(); cmd_fill.add_arguments(p)
sys.exit(run_reporting_errors(lambda: cmd_fill.main(p.parse_args(sys.argv[1:]))))
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("full", [False, True])
def test_kill9_then_rerun_resumes_and_gives_identical_file(tmp_path, full):
    run = make_run(tmp_path, n_users=60, n_items=30)
    mode = ["--full"] if full else ["--k", "4"]
    args = ["--model", str(run), *mode, "--user-block", "7", "--quiet"]
    clean = tmp_path / "clean.parquet"
    assert fill(*args, "--out", str(clean)) == 0
    out = tmp_path / "recs.parquet"
    cmd = [sys.executable, "-c", KILL_SCRIPT, *args, "--out", str(out)]
    env = dict(os.environ, SVDFILL_TEST_KILL_AFTER_BLOCK="3")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    partial = tmp_path / ".recs.parquet.partial"
    assert not out.exists() and partial.is_dir()
    assert sorted(p.name for p in partial.glob("block-*.arrow")) == [f"block-{b:06d}.arrow" for b in range(4)]
    # a half-written part of the next block, as a kill mid-write leaves it
    (partial / "block-000004.arrow.tmp").write_bytes(b"garbage")
    r = subprocess.run([*cmd[:-2], "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "SVDFILL_TEST_KILL_AFTER_BLOCK"})
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == clean.read_bytes()
    assert not partial.exists()


def test_a_write_failure_on_the_writer_thread_stops_the_export_and_resumes(tmp_path, monkeypatch):
    """Blocks are written on a thread while the next is computed: an error there (here a
    full disk at block 2) surfaces from the export, leaves blocks 0-1 for a resume, and the
    rerun gives the file an uninterrupted run gives."""
    from svdfill.data.export import ResumableParquetWriter

    run = make_run(tmp_path, n_users=60, n_items=30)
    args = ["--model", str(run), "--k", "4", "--user-block", "7", "--quiet"]
    clean = tmp_path / "clean.parquet"
    assert fill(*args, "--out", str(clean)) == 0
    real = ResumableParquetWriter.write_block

    def disk_full_at_2(self, b, table):
        if b == 2:
            raise OSError(28, "No space left on device")
        real(self, b, table)

    monkeypatch.setattr(ResumableParquetWriter, "write_block", disk_full_at_2)
    out = tmp_path / "recs.parquet"
    with pytest.raises(ExportError, match="No space left.*2 of 9 blocks are finished.*rerun the same command"):
        cmd_fill.main(parse(*args, "--out", str(out)))
    partial = tmp_path / ".recs.parquet.partial"
    assert not out.exists()
    assert sorted(p.name for p in partial.glob("block-*.arrow")) == ["block-000000.arrow", "block-000001.arrow"]
    monkeypatch.setattr(ResumableParquetWriter, "write_block", real)
    assert fill(*args, "--out", str(out)) == 0
    assert out.read_bytes() == clean.read_bytes() and not partial.exists()


def _file_size_limit(limit: int):
    """For a child process: writes past ``limit`` bytes fail with EFBIG (File too large), as
    on a full disk, instead of killing it with SIGXFSZ."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ as on Linux")
def test_a_real_write_error_is_one_clear_line_and_the_rerun_resumes(tmp_path):
    """The OS refuses a write (the file size limit, set below the finished file's size, so
    the Parquet file cannot be completed — what a full disk does): exit code 2, one line
    naming the output, the OS reason and what survives; no traceback, no output file; the
    same command without the limit then finishes from the kept blocks, byte-identical."""
    run = make_run(tmp_path, n_users=200, n_items=100)
    args = ["--model", str(run), "--full", "--user-block", "5", "--quiet"]
    clean = tmp_path / "clean.parquet"
    assert fill(*args, "--out", str(clean)) == 0
    out = tmp_path / "recs.parquet"
    cmd = [sys.executable, "-c", KILL_SCRIPT, *args, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       preexec_fn=_file_size_limit(clean.stat().st_size * 6 // 10))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"svdfill: error: {out}: writing the export failed") and "File too large" in err, err
    assert "of 40 blocks are finished and kept in" in err and "rerun the same command to resume" in err, err
    partial = tmp_path / ".recs.parquet.partial"
    assert not out.exists() and len(list(partial.glob("block-*.arrow"))) >= 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == clean.read_bytes() and not partial.exists()


def test_unwritable_paths_name_the_path_without_errno_noise(tmp_path, capsys):
    from svdfill.launch.errors import os_error_message

    missing = tmp_path / "nowhere" / "x"
    try:
        open(missing)
    except OSError as e:
        assert os_error_message(e) == f"{missing}: No such file or directory"
    assert run_reporting_errors(lambda: open(missing)) == 2
    assert capsys.readouterr().err.strip() == f"svdfill: error: {missing}: No such file or directory"


def test_resume_with_other_parameters_is_refused_then_restart(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "recs.parquet"
    env_args = ["--model", str(run), "--user-block", "5", "--quiet", "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *env_args, "--k", "4"], capture_output=True,
                       env=dict(os.environ, SVDFILL_TEST_KILL_AFTER_BLOCK="1"), timeout=120)
    assert r.returncode == -9
    assert fill(*env_args, "--k", "5") == 2
    err = capsys.readouterr().err
    assert "different parameters" in err and "svdfill.k" in err and "--restart" in err
    assert fill(*env_args, "--k", "5", "--restart") == 0
    assert pq.read_table(out).num_rows > 0 and read_export_metadata(out)["svdfill.k"] == "5"


def test_k_larger_than_items_is_clamped_with_warning(tmp_path, capsys):
    run = make_run(tmp_path, n_users=5, n_items=6)
    out = tmp_path / "r.parquet"
    assert fill("--model", str(run), "--k", "100", "--out", str(out), "--quiet") == 0
    assert "using k = 6" in capsys.readouterr().err
    assert read_export_metadata(out)["svdfill.k"] == "6"


@pytest.mark.parametrize("k", ["0", "-3"])
def test_k_not_positive_is_an_error(tmp_path, capsys, k):
    run = make_run(tmp_path)
    assert fill("--model", str(run), "--k", k, "--out", str(tmp_path / "r.parquet")) == 2
    assert "--k must be at least 1" in capsys.readouterr().err


def test_unknown_users_are_listed(tmp_path, capsys):
    run = make_run(tmp_path)
    users = tmp_path / "users.txt"
    users.write_text("1000\n7\n1003\n8\n9\n10\n11\n12\n13\n")
    assert fill("--model", str(run), "--k", "5", "--out", str(tmp_path / "r.parquet"), "--users", str(users)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "7 user id(s) not in the model" in err and "7 (line 2)" in err and "and 2 more" in err


def test_non_integer_user_id_names_the_line(tmp_path, capsys):
    run = make_run(tmp_path)
    users = tmp_path / "users.txt"
    users.write_text("1000\nbob\n")
    assert fill("--model", str(run), "--out", str(tmp_path / "r.parquet"), "--users", str(users)) == 2
    assert f"{users}:2: not an integer user id: 'bob'" in capsys.readouterr().err


def test_missing_and_corrupt_model_dirs(tmp_path, capsys):
    assert fill("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.parquet")) == 2
    assert "no such run directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a torch file")
    assert fill("--model", str(bad), "--out", str(tmp_path / "r.parquet")) == 2
    assert "model.pt" in capsys.readouterr().err
    run = make_run(tmp_path)
    (run / "seen.pt").write_bytes(b"\x00" * 10)
    assert fill("--model", str(run), "--out", str(tmp_path / "r.parquet")) == 2
    assert "seen.pt" in capsys.readouterr().err
    (run / "seen.pt").unlink()
    assert fill("--model", str(run), "--out", str(tmp_path / "r.parquet")) == 2
    assert "--no-exclude-seen" in capsys.readouterr().err


def test_output_path_not_writable(tmp_path, capsys):
    run = make_run(tmp_path)
    assert fill("--model", str(run), "--out", str(tmp_path / "no" / "such" / "r.parquet")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fill("--model", str(run), "--out", str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that may write anywhere (root)")
        assert fill("--model", str(run), "--out", str(ro / "r.parquet")) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_device_cuda_without_gpu_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = make_run(tmp_path)
    assert fill("--model", str(run), "--out", str(tmp_path / "r.parquet"), "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_gpu_dtype_of_the_run_computes_in_float32_on_cpu(tmp_path, capsys):
    """fill.dtype = bfloat16 (a tensor-core setting, e.g. configs/synthetic-600k.toml) on a
    CPU fill: float32 with a note, exact as float32; an explicit --dtype is obeyed."""
    from svdfill.config import apply_overrides

    run = make_run(tmp_path, cfg=apply_overrides(Config(), {"fill.dtype": "bfloat16"}))
    out = tmp_path / "r.parquet"
    assert fill("--model", str(run), "--k", "5", "--out", str(out), "--device", "cpu") == 0
    assert "fill.dtype = bfloat16 is a GPU setting; computing in float32" in capsys.readouterr().out
    assert read_export_metadata(out)["svdfill.dtype"] == "float32"
    ref = reference(run, 5, np.load(tmp_path / "seen_mask.npy"))
    assert [(u, i, r) for u, i, _, r in rows_of(out)] == [(u, i, r) for u, i, _, r in ref]
    forced = tmp_path / "bf.parquet"
    assert fill("--model", str(run), "--k", "5", "--out", str(forced), "--device", "cpu",
                "--dtype", "bfloat16", "--quiet") == 0
    assert read_export_metadata(forced)["svdfill.dtype"] == "bfloat16"


def test_cuda_export_equals_cpu_export(tmp_path, cuda):
    run = make_run(tmp_path)
    a, b = tmp_path / "cpu.parquet", tmp_path / "gpu.parquet"
    assert fill("--model", str(run), "--k", "6", "--out", str(a), "--device", "cpu", "--quiet") == 0
    assert fill("--model", str(run), "--k", "6", "--out", str(b), "--device", "cuda", "--quiet") == 0
    assert pq.read_table(a).equals(pq.read_table(b))
