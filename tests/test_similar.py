"""Similar items (fill.similar, `svdfill similar`) against a float64 brute force written from
the definition: cosine (0 with a zero vector) or dot product of the item factors, the item
itself excluded, ties to the lower item id. Exact where the unit vectors are exact (norms
that are powers of two), within float32 rounding otherwise."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reference import dyadic
from svdfill.checkpoint import save_model
from svdfill.config import Config
from svdfill.data.idmap import IdMap
from svdfill.fill.similar import export_similar, similar_items, unit_rows
from svdfill.launch import cmd_similar
from svdfill.launch.errors import run_reporting_errors


def similar_reference(Q, k, metric, items=None):
    """``(scores float64 [n, k], items int64 [n, k])``: brute force over all pairs in
    float64, the diagonal excluded, stable sort (ties → lower id), padding (−inf, −1)."""
    q = Q.double()
    if metric == "cosine":
        norm = q.norm(dim=1)
        S = (q @ q.T) / (norm[:, None] * norm[None, :])
        S[(norm[:, None] == 0) | (norm[None, :] == 0)] = 0.0  # cosine with a zero vector: 0
    else:
        S = q @ q.T
    S.fill_diagonal_(float("-inf"))
    rows = torch.arange(Q.shape[0]) if items is None else torch.as_tensor(items)
    S = S[rows]
    order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
    sc = torch.gather(S, 1, order)
    it = torch.where(torch.isneginf(sc), -1, order)
    if k > S.shape[1]:
        pad = k - S.shape[1]
        sc = torch.cat([sc, torch.full((len(rows), pad), float("-inf"), dtype=sc.dtype)], 1)
        it = torch.cat([it, torch.full((len(rows), pad), -1)], 1)
    return sc, it


def exact_norm_factors(n, d, gen, zero_rows=()):
    """Rows with 1, 4 or 16 entries of ±1 (the rest 0), times a power of two: their norms
    are powers of two, so the unit vectors and every cosine are exact in float32, and equal
    cosines (ties) are everywhere. ``zero_rows`` are all zero."""
    Q = torch.zeros(n, d)
    for i in range(n):
        if i in zero_rows:
            continue
        sizes = [m for m in (1, 4, 16) if m <= d]
        nnz = sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))]
        cols = torch.randperm(d, generator=gen)[:nnz]
        signs = torch.randint(0, 2, (nnz,), generator=gen).float() * 2 - 1
        Q[i, cols] = signs * 2.0 ** int(torch.randint(-2, 3, (1,), generator=gen))
    return Q


def state_of(Q):
    n = Q.shape[0]
    return {"user_factors": torch.ones(3, Q.shape[1]), "item_factors": Q,
            "user_bias": torch.zeros(3), "item_bias": torch.randn(n), "global_mean": torch.tensor(3.0)}


DEVICES = ["cpu", "cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        return request.getfixturevalue("cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the API

@pytest.mark.parametrize("n,d,k", [(1, 4, 3), (2, 16, 1), (37, 16, 5), (131, 20, 17), (64, 16, 70)])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_exact_with_ties_and_ragged_sizes(n, d, k, metric, device):
    gen = torch.Generator().manual_seed(n * 100 + k)
    Q = exact_norm_factors(n, d, gen, zero_rows={n // 2} if n > 2 else ())
    want_s, want_i = similar_reference(Q, k, metric)
    for budget in (None, 1 << 20):  # one tile, and many small tiles
        s, i = similar_items(state_of(Q), k, metric=metric, device=device, memory_budget=budget)
        assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.device.type == device.type
        assert torch.equal(i.cpu(), want_i), (metric, i, want_i)
        assert torch.equal(s.cpu().double(), want_s)
    # self never appears; every row is full where there are enough other items
    rows = torch.arange(n)[:, None]
    assert not (i.cpu() == rows).any()
    assert ((i.cpu() >= 0).sum(1) == min(k, n - 1)).all()


def test_dyadic_dot_has_many_ties_broken_by_lower_id(device):
    gen = torch.Generator().manual_seed(7)
    Q = dyadic((203, 6), gen, scale=2, lo=-1, hi=2)  # values in {-0.5, 0, 0.5}: ties galore
    want = similar_reference(Q, 9, "dot")
    got = similar_items(state_of(Q), 9, metric="dot", device=device, memory_budget=1 << 20)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu().double(), want[0])


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_gaussian_factors_within_float32_rounding(metric, device):
    gen = torch.Generator().manual_seed(11)
    Q = torch.randn(257, 24, generator=gen)
    k = 12
    want_s, want_i = similar_reference(Q, k, metric)
    s, i = similar_items(state_of(Q), k, metric=metric, device=device)
    s, i = s.cpu().double(), i.cpu()
    tol = 1e-5 * (1 if metric == "cosine" else float(Q.norm(dim=1).max() ** 2))
    assert torch.allclose(s, want_s, atol=tol, rtol=0)
    # any item that differs from the reference scores within the tolerance of the cut
    q = Q.double()
    S = (unit_rows(Q).double() @ unit_rows(Q).double().T) if metric == "cosine" else q @ q.T
    assert (i == want_i).float().mean() > 0.99
    got_true = torch.gather(S, 1, i)
    assert (got_true >= want_s[:, -1:] - tol).all()


def test_zero_vector_cosine_is_zero():
    Q = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    s, i = similar_items(state_of(Q), 3, metric="cosine")
    # the zero item: every other item at cosine 0, lowest ids first
    assert i[1].tolist() == [0, 2, 3] and s[1].tolist() == [0.0, 0.0, 0.0]
    # others: the zero item ranks by cosine 0, i.e. with the orthogonal item (lower id first)
    assert i[0].tolist() == [1, 2, 3] and s[0].tolist() == [0.0, 0.0, -1.0]
    assert i[3].tolist() == [1, 2, 0] and s[3].tolist() == [0.0, 0.0, -1.0]


def test_subset_of_items_in_given_order():
    gen = torch.Generator().manual_seed(3)
    Q = exact_norm_factors(50, 16, gen)
    items = np.array([49, 0, 17, 3])
    want = similar_reference(Q, 6, "cosine", items=items)
    got = similar_items(state_of(Q), 6, items=items)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0].double(), want[0])


def test_bad_arguments():
    Q = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        similar_items(state_of(Q), 0)
    with pytest.raises(ValueError, match="metric 'euclid'"):
        similar_items(state_of(Q), 2, metric="euclid")
    with pytest.raises(IndexError, match="outside"):
        similar_items(state_of(Q), 2, items=[5])


# ----------------------------------------------------------------------------- the export + CLI

def make_run(root, n_items=40, *, str_items=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q = exact_norm_factors(n_items, 16, gen, zero_rows={3})
    state = {"user_factors": torch.randn(7, 16, generator=gen), "item_factors": Q,
             "user_bias": torch.zeros(7), "item_bias": torch.randn(n_items, generator=gen),
             "global_mean": torch.tensor(3.5)}
    items = (np.array([f"m{i:03d}" for i in range(n_items)], dtype=object) if str_items
             else 500 + 7 * np.arange(n_items))
    run = root / "run"
    save_model(run, state, IdMap(1000 + np.arange(7), items), Config(), {})
    return run, Q, items


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd_similar.add_arguments(p)
    return p.parse_args(list(argv))


def run_cli(*argv: str) -> int:
    return run_reporting_errors(lambda: cmd_similar.main(parse(*argv)))


def rows_of(table):
    return list(zip(*(table.column(c).to_pylist() for c in ("item_id", "neighbor_id", "score", "rank"))))


@pytest.mark.parametrize("str_items", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_cli_writes_parquet_with_raw_ids(tmp_path, capsys, str_items, metric):
    run, Q, raw = make_run(tmp_path, str_items=str_items)
    out = tmp_path / "sim.parquet"
    assert run_cli("--model", str(run), "--out", str(out), "--k", "5", "--metric", metric,
                   "--device", "cpu") == 0
    assert "neighbours of 40 items" in capsys.readouterr().out
    t = pq.read_table(out)
    assert t.schema.names == ["item_id", "neighbor_id", "score", "rank"]
    assert str(t.schema.field("score").type) == "float" and str(t.schema.field("rank").type) == "int16"
    assert str(t.schema.field("item_id").type) == ("string" if str_items else "int64")
    md = pq.read_schema(out).metadata
    assert md[b"svdfill.mode"] == b"similar" and md[b"svdfill.metric"] == metric.encode()
    sc, it = similar_reference(Q, 5, metric)
    want = [(raw[a], raw[int(it[a, r])], float(np.float32(sc[a, r])), r + 1)
            for a in range(40) for r in range(5)]
    assert rows_of(t) == want
    assert not list(tmp_path.glob(".sim.parquet*"))  # no partial folder left


def test_cli_items_file_and_k_clamped(tmp_path, capsys):
    run, Q, raw = make_run(tmp_path, n_items=6, str_items=False)
    lst = tmp_path / "items.txt"
    lst.write_text("# two items\n521\n\n500\n521\n")
    out = tmp_path / "sim.parquet"
    assert run_cli("--model", str(run), "--out", str(out), "--k", "99", "--items", str(lst),
                   "--device", "cpu", "--quiet") == 0
    err = capsys.readouterr().err
    assert "using k = 5" in err and "1 duplicate item id(s) ignored" in err
    t = pq.read_table(out)
    assert t.column("item_id").to_pylist() == [521] * 5 + [500] * 5
    sc, it = similar_reference(Q, 5, "cosine", items=[3, 0])
    assert t.column("neighbor_id").to_pylist() == [int(raw[j]) for j in it.flatten()]


def test_export_resumes_after_kill_9_byte_identical(tmp_path):
    """Item blocks of 64 → 5 row groups; a real kill -9 after block 1, then the rerun
    resumes at block 2 and writes the same bytes as an uninterrupted export."""
    import os

    from svdfill.checkpoint import load_model

    run, _, _ = make_run(tmp_path, n_items=300)
    out, again = tmp_path / "sim.parquet", tmp_path / "again.parquet"
    code = ("import sys; from svdfill.checkpoint import load_model; "
            "from svdfill.fill.similar import export_similar; m = load_model(sys.argv[1]); "
            "export_similar(m.state, m.idmap, sys.argv[2], k=4, block=64, quiet=True)")
    env = dict(os.environ, SVDFILL_TEST_KILL_AFTER_BLOCK="1")
    assert subprocess.run([sys.executable, "-c", code, str(run), str(out)], env=env).returncode == -9
    assert not out.exists() and (tmp_path / ".sim.parquet.partial").is_dir()
    m = load_model(run)
    summary = export_similar(m.state, m.idmap, out, k=4, block=64, quiet=True)
    assert summary["resumed_at"] == 2 and summary["blocks"] == 5
    export_similar(m.state, m.idmap, again, k=4, block=64, quiet=True)
    assert out.read_bytes() == again.read_bytes()
    assert pq.ParquetFile(out).num_row_groups == 5


@pytest.mark.parametrize("k", ["0", "-3"])
def test_cli_bad_k(tmp_path, capsys, k):
    run, _, _ = make_run(tmp_path)
    assert run_cli("--model", str(run), "--out", str(tmp_path / "s.parquet"), "--k", k) == 2
    assert f"--k must be at least 1, got {k}" in capsys.readouterr().err


def test_cli_missing_model_and_bad_items(tmp_path, capsys):
    assert run_cli("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.parquet")) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdfill: error: ") and "nope: no such run directory" in err
    run, _, _ = make_run(tmp_path, str_items=False)
    lst = tmp_path / "items.txt"
    lst.write_text("500\nabc\n")
    assert run_cli("--model", str(run), "--out", str(tmp_path / "s.parquet"), "--items", str(lst)) == 2
    assert f"{lst}:2: not an integer item id: 'abc'" in capsys.readouterr().err
    lst.write_text("500\n999\n")
    assert run_cli("--model", str(run), "--out", str(tmp_path / "s.parquet"), "--items", str(lst)) == 2
    assert "1 item id(s) not in the model: 999 (line 2)" in capsys.readouterr().err
    assert run_cli("--model", str(run), "--out", str(tmp_path / "no" / "s.parquet")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_matches_api_on_a_catalogue_of_ml100k_size(tmp_path):
    """1,682 items (not a block multiple), Gaussian factors, small tiles: the file holds
    exactly :func:`similar_items`'s lists, which match the brute force within rounding."""
    gen = torch.Generator().manual_seed(0)
    n = 1682
    Q = torch.randn(n, 16, generator=gen)
    idmap = IdMap(np.arange(3), np.array([f"i{j:04d}" for j in range(n)], dtype=object))
    out = tmp_path / "sim.parquet"
    export_similar(state_of(Q), idmap, out, k=10, memory_budget=1 << 20, block=500, quiet=True)
    t = pq.read_table(out)
    assert t.num_rows == n * 10 and pq.ParquetFile(out).num_row_groups == 4
    got = idmap.encode_items(t.column("neighbor_id").to_numpy(zero_copy_only=False)).reshape(n, 10)
    s, i = similar_items(state_of(Q), 10, memory_budget=1 << 20)
    assert np.array_equal(got, i.numpy())
    assert np.array_equal(t.column("score").to_numpy().reshape(n, 10), s.numpy())
    _, want_i = similar_reference(Q, 10, "cosine")
    assert (i == want_i).float().mean() > 0.99


# ------------------------------------------------------------------ at scale: torchrun and Ray

def _one_process_similar(run, out, *argv):
    assert run_cli("--model", str(run), "--out", str(out), "--device", "cpu", "--quiet", *argv) == 0
    return pq.read_table(out)


@pytest.mark.multiprocess
def test_torchrun_w2_writes_the_one_process_file(tmp_path):
    """`svdfill similar --launcher torchrun --nproc 2`: two item shards of the neighbour table,
    rank 0 merges and writes; rows and metadata equal the one-process export's."""
    from test_torchrun import svdfill_cli

    run, _, _ = make_run(tmp_path, n_items=53)  # ragged shards (27 + 26)
    got = tmp_path / "tr.parquet"
    p = svdfill_cli("similar", "--model", run, "--out", got, "--k", "6", "--metric", "cosine",
                    "--launcher", "torchrun", "--nproc", "2")
    assert "neighbours of 53 items" in p.stdout and "with 2 item shards" in p.stdout, p.stdout
    want = _one_process_similar(run, tmp_path / "one.parquet", "--k", "6")
    assert rows_of(pq.read_table(got)) == rows_of(want)
    md_got, md_want = pq.read_schema(got).metadata, pq.read_schema(tmp_path / "one.parquet").metadata
    assert md_got[b"svdfill.n_query_items"] == md_want[b"svdfill.n_query_items"] == b"53"


@pytest.mark.multiprocess
def test_ray_actors_write_the_one_process_file(tmp_path, request):
    """`python -m svdfill.launch.ray_job similar` on a local Ray cluster: 2 actors, each one
    item shard of the neighbour table; the file equals the one-process export."""
    from ray_helpers import ray_env, shared_head

    head = shared_head(request)
    run, _, _ = make_run(tmp_path, n_items=41, str_items=False)
    got = tmp_path / "ray.parquet"
    items_file = tmp_path / "items.txt"
    items_file.write_text("".join(f"{500 + 7 * i}\n" for i in (40, 3, 17, 0)))
    cmd = [sys.executable, "-m", "svdfill.launch.ray_job", "similar", "--model", str(run),
           "--k", "4", "--metric", "dot", "--items", str(items_file), "--out", str(got),
           "--num-actors", "2", "--address", head.gcs_address, "--device", "cpu"]
    p = subprocess.run(cmd, env=ray_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "from node 127.0.0.1" in p.stdout
    want = _one_process_similar(run, tmp_path / "one.parquet", "--k", "4", "--metric", "dot",
                                "--items", str(items_file))
    assert rows_of(pq.read_table(got)) == rows_of(want)
    assert [r[0] for r in rows_of(want)[::4]] == [780, 521, 619, 500]  # file order kept
