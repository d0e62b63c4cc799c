"""Factor export (data.factors, `svdfill export-factors`): the Parquet folder read back with
pyarrow alone (no torch in the reading process) equals the model's tensors, for int and
string raw ids; the Spark folder loads in a real local Spark (loopback) and predicts what
svdfill predicts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from svdfill.checkpoint import load_model, save_model
from svdfill.config import Config
from svdfill.data.idmap import IdMap
from svdfill.launch import cmd_export_factors
from svdfill.launch.errors import run_reporting_errors


def make_run(root, *, str_ids=False, big_ids=False, n_users=23, n_items=17, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {"user_factors": torch.randn(n_users, d, generator=gen),
             "item_factors": torch.randn(n_items, d, generator=gen),
             "user_bias": torch.randn(n_users, generator=gen) * 0.3,
             "item_bias": torch.randn(n_items, generator=gen) * 0.3,
             "global_mean": torch.tensor(3.53)}
    if str_ids:
        users = np.array([f"u{i:03d}" for i in range(n_users)], dtype=object)
        items = np.array([f"movie-{i:03d}" for i in range(n_items)], dtype=object)
    else:
        base = 2**40 if big_ids else 100
        users, items = base + 3 * np.arange(n_users), 7 + 11 * np.arange(n_items)
    run = root / "run"
    save_model(run, state, IdMap(users, items), Config(), {})
    return run


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd_export_factors.add_arguments(p)
    return p.parse_args(list(argv))


def run_cli(*argv: str) -> int:
    return run_reporting_errors(lambda: cmd_export_factors.main(parse(*argv)))


READ_WITHOUT_TORCH = r"""
import json, sys
import pyarrow.parquet as pq
out = sys.argv[1]
res = {}
for side in ("users", "items"):
    t = pq.read_table(f"{out}/{side}.parquet")
    res[side] = {"schema": [f"{f.name}:{f.type}" for f in t.schema],
                 "ids": t.column(0).to_pylist(), "bias": t.column("bias").to_pylist(),
                 "factors": t.column("factors").to_pylist()}
res["model"] = json.load(open(f"{out}/model.json"))
res["torch_loaded"] = "torch" in sys.modules
print(json.dumps(res))
"""


@pytest.mark.parametrize("str_ids", [False, True])
def test_parquet_round_trip_with_pyarrow_only(tmp_path, capsys, str_ids):
    run = make_run(tmp_path, str_ids=str_ids)
    out = tmp_path / "factors"
    assert run_cli("--model", str(run), "--out", str(out)) == 0
    assert "exported 23 users and 17 items (d = 5) as parquet" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, str(out)], capture_output=True,
                          text=True, check=True)
    got = json.loads(proc.stdout)
    assert got["torch_loaded"] is False
    m = load_model(run)
    id_type = "string" if str_ids else "int64"
    for side, key, ids in (("users", "user", m.idmap.user_ids), ("items", "item", m.idmap.item_ids)):
        g = got[side]
        assert g["schema"] == [f"{key}_id:{id_type}", "bias:float",
                               "factors:fixed_size_list<element: float>[5]"]
        assert g["ids"] == list(ids)
        # float32 values survive JSON as their exact float64 values
        assert np.array_equal(np.array(g["bias"], np.float32), m.state[f"{key}_bias"].numpy())
        assert np.array_equal(np.array(g["factors"], np.float32), m.state[f"{key}_factors"].numpy())
    info = got["model"]
    assert info["global_mean"] == float(m.state["global_mean"])
    assert (info["factors"], info["n_users"], info["n_items"]) == (5, 23, 17)
    import hashlib

    import svdfill

    assert info["model_sha256"] == hashlib.sha256(m.path.read_bytes()).hexdigest()
    assert info["svdfill_version"] == svdfill.__version__
    assert info["user_id_type"] == ("str" if str_ids else "int64")


def test_prediction_formula_from_the_files(tmp_path):
    import pyarrow.parquet as pq

    from svdfill.data.factors import export_factors

    run = make_run(tmp_path)
    m = load_model(run)
    out = export_factors(m.state, m.idmap, tmp_path / "f")
    mu = json.loads((out / "model.json").read_text())["global_mean"]
    U, I = pq.read_table(out / "users.parquet"), pq.read_table(out / "items.parquet")
    P = np.array(U.column("factors").to_pylist(), np.float64)
    Q = np.array(I.column("factors").to_pylist(), np.float64)
    pred = mu + U.column("bias").to_numpy()[:, None] + I.column("bias").to_numpy()[None, :] + P @ Q.T
    ours = m.to_module().predict(torch.arange(23).repeat_interleave(17), torch.arange(17).repeat(23))
    assert np.allclose(pred.reshape(-1), ours.double().numpy(), atol=1e-5)


def test_existing_folder_refused_then_overwritten_atomically(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "f"
    out.mkdir()  # an empty folder is fine
    assert run_cli("--model", str(run), "--out", str(out), "--quiet") == 0
    assert run_cli("--model", str(run), "--out", str(out), "--quiet") == 2
    assert "folder exists and is not empty (add --overwrite" in capsys.readouterr().err
    (out / "stale.txt").write_text("x")
    assert run_cli("--model", str(run), "--out", str(out), "--overwrite", "--quiet") == 0
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "model.json", "users.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    ref = tmp_path / "made_by_mkdir"
    ref.mkdir()
    assert out.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777  # the umask's, not mkdtemp's 0700


def test_bad_input_is_one_line(tmp_path, capsys):
    assert run_cli("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "f")) == 2
    assert "nope: no such run directory" in capsys.readouterr().err
    run = make_run(tmp_path)
    assert run_cli("--model", str(run), "--out", str(tmp_path / "no" / "f")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run_cli("--model", str(run), "--out", str(tmp_path / "file")) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--model", str(run), "--out", "x", "--format", "csv")


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from svdfill.data import factors

    run = make_run(tmp_path)
    m = load_model(run)

    def boom(folder, *a):
        (folder / "users.parquet").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(factors, "write_parquet_factors", boom)
    with pytest.raises(OSError):
        factors.export_factors(m.state, m.idmap, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_spark_ids_and_folding_without_spark(tmp_path):
    import pyarrow.parquet as pq

    from svdfill.data.factors import export_factors

    run = make_run(tmp_path, str_ids=True)
    m = load_model(run)
    out = export_factors(m.state, m.idmap, tmp_path / "s", format="spark")
    meta = json.loads((out / "metadata" / "part-00000").read_text())
    assert meta["class"] == "org.apache.spark.ml.recommendation.ALSModel" and meta["rank"] == 7
    uf = pq.read_table(out / "userFactors")
    assert str(uf.schema.field("id").type) == "int32" and uf.column("id").to_pylist() == list(range(23))
    ids = pq.read_table(out / "svdfill_user_ids.parquet")
    assert ids.column("raw_id").to_pylist() == list(m.idmap.user_ids)
    info = json.loads((out / "svdfill.json").read_text())
    assert info["user_ids"].startswith("contiguous") and info["factors"] == 5
    # the folded features predict μ + b_u + b_i + p·q
    U = np.array(uf.column("features").to_pylist(), np.float64)
    Q = np.array(pq.read_table(out / "itemFactors").column("features").to_pylist(), np.float64)
    ours = m.to_module().predict(torch.arange(23).repeat_interleave(17), torch.arange(17).repeat(23))
    assert np.allclose((U @ Q.T).reshape(-1), ours.double().numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- a real Spark

def _spark_or_skip():
    from svdfill.bench.peer_spark import spark_available

    why = spark_available()
    if why is not None:
        pytest.skip(f"Spark unavailable: {why}")


@pytest.fixture(scope="module")
def spark():
    """One local Spark on loopback for the module (each JVM start costs ~10 s)."""
    _spark_or_skip()
    from svdfill.bench.peer_spark import local_spark

    with local_spark(threads=2, memory="1g") as session:
        yield session


@pytest.mark.parametrize("ids", ["raw", "string", "beyond-int32"])
def test_spark_loads_the_folder_and_predicts_like_svdfill(tmp_path, spark, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.recommendation import ALSModel

    from svdfill.data.factors import spark_ids

    run = make_run(tmp_path, str_ids=ids == "string", big_ids=ids == "beyond-int32")
    out = tmp_path / "spark_model"
    assert run_cli("--model", str(run), "--out", str(out), "--format", "spark", "--quiet") == 0
    m = load_model(run)
    rng = np.random.default_rng(1)
    u = rng.integers(0, 23, 40)
    i = rng.integers(0, 17, 40)
    # Spark's ids per axis: the raw ones where they are int32, else contiguous + an id file
    u_sp, u_raw = spark_ids(m.idmap.user_ids)
    i_sp, i_raw = spark_ids(m.idmap.item_ids)
    assert (u_raw, i_raw) == {"raw": (True, True), "string": (False, False),
                              "beyond-int32": (False, True)}[ids]
    if not u_raw:
        umap = pq.read_table(out / "svdfill_user_ids.parquet")
        assert umap.column("raw_id").to_pylist() == list(m.idmap.user_ids)
        assert umap.column("id").to_pylist() == list(range(23))
    assert (out / "svdfill_item_ids.parquet").exists() == (not i_raw)
    su, si = u_sp[u], i_sp[i]
    ours = m.to_module().predict(torch.from_numpy(u), torch.from_numpy(i)).numpy()
    model = ALSModel.load(str(out))
    assert model.rank == 7
    df = spark.createDataFrame(pa.table({"row": np.arange(40), "user": su, "item": si}))
    pred = model.transform(df).select("row", "prediction").toArrow().sort_by("row")
    got = pred.column("prediction").to_numpy()
    # the top items of one user, ranked by Spark, are svdfill's ranking
    recs = model.recommendForUserSubset(spark.createDataFrame(pa.table({"user": su[:1]})), 3)
    top = recs.toArrow().column("recommendations").combine_chunks().flatten().field("item")
    assert np.allclose(got, ours, rtol=0, atol=1e-5), (got, ours)
    scores = m.to_module().predict(torch.full((17,), int(u[0])), torch.arange(17)).numpy()
    want = np.argsort(-scores, kind="stable")[:3]
    want_ids = i_sp[want]
    assert top.to_pylist() == [int(x) for x in want_ids]
