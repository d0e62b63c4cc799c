"""Item filters of the fill (``--items-allow``, ``--items-deny``, ``--exclude``): the pure
pieces of :mod:`svdfill.fill.filters`, the fill on the filtered inputs against the float64
reference with the filters applied by masking (every implementation: the filters live
outside the kernels), and `svdfill fill` with each option (raw ids, file:line errors,
``--skip-unknown``, the unfiltered file unchanged, the resume keyed by the filter files)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reference import assert_topk_exact, csr_from_mask, topk_reference
from svdfill.fill.filters import (allowed_items, compact_items, expand_items, filter_fill_inputs,
                                  merge_exclusions)
from test_cli_fill import fill, make_run, reference, rows_of
from test_fill import impl, make_inputs  # noqa: F401  (the implementation fixture)


def mask_csr(mask: np.ndarray):
    return csr_from_mask(mask)


def csr_to_mask(seen, U: int, I: int) -> np.ndarray:
    m = np.zeros((U, I), dtype=bool)
    ip, ix = seen[0].numpy(), seen[1].numpy()
    for u in range(U):
        m[u, ix[ip[u]:ip[u + 1]]] = True
    return m


# --------------------------------------------------------------------------- pure pieces

def test_allowed_items_is_ascending_and_deny_wins():
    assert allowed_items(6).tolist() == list(range(6))
    assert allowed_items(6, allow=[4, 1, 4, 2]).tolist() == [1, 2, 4]
    assert allowed_items(6, deny=[0, 5]).tolist() == [1, 2, 3, 4]
    assert allowed_items(6, allow=[4, 1, 2], deny=[2, 3]).tolist() == [1, 4]
    assert allowed_items(6).dtype == torch.int64


def test_compact_items_and_merge_exclusions_on_ragged_rows():
    rng = np.random.default_rng(1)
    U, I = 9, 13
    mask = rng.random((U, I)) < 0.4
    mask[0], mask[1] = True, False
    seen = mask_csr(mask)
    allowed = allowed_items(I, deny=[0, 3, 12])
    sub = compact_items(allowed, seen, I)
    assert sub[0].dtype == torch.int64 and sub[1].dtype == torch.int32
    np.testing.assert_array_equal(csr_to_mask(sub, U, allowed.numel()), mask[:, allowed.numpy()])
    assert compact_items(allowed, None, I) is None

    users = torch.tensor([1, 1, 4, 8, 8, 1])
    items = torch.tensor([5, 2, 0, 12, 12, 5])  # duplicates, and pairs already seen
    want = mask.copy()
    want[users.numpy(), items.numpy()] = True
    merged = merge_exclusions(seen, users, items, U, I)
    assert merged[1].dtype == torch.int32
    np.testing.assert_array_equal(csr_to_mask(merged, U, I), want)
    for u in range(U):  # rows sorted, no duplicates
        row = merged[1][merged[0][u]:merged[0][u + 1]].numpy()
        assert (np.diff(row) > 0).all()
    alone = merge_exclusions(None, users, items, U, I)
    np.testing.assert_array_equal(csr_to_mask(alone, U, I), np.isin(np.arange(U * I).reshape(U, I),
                                                                     users.numpy() * I + items.numpy()))


def test_expand_items_keeps_padding():
    allowed = torch.tensor([2, 5, 9])
    idx = torch.tensor([[2, 0, -1], [1, -1, -1]])
    assert expand_items(idx, allowed).tolist() == [[9, 2, -1], [5, -1, -1]]


def test_no_item_left_is_an_error():
    state = {"user_factors": torch.zeros(2, 1), "item_factors": torch.zeros(3, 1),
             "user_bias": torch.zeros(2), "item_bias": torch.zeros(3), "global_mean": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="no item"):
        filter_fill_inputs(state, None, None, allow=[1], deny=[1])


# --------------------------------------------------------------------------- exact vs reference

CASES = {
    "allow": dict(allow=True),
    "deny": dict(deny=True),
    "both": dict(allow=True, deny=True),
    "exclude": dict(exclude=True),
    "all": dict(allow=True, deny=True, exclude=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("U,I,k", [(23, 37, 5), (7, 130, 17), (40, 9, 4)])
def test_filtered_fill_equals_masked_reference(impl, case, U, I, k):  # noqa: F811
    """Ragged sizes, dyadic scores (ties at the k-th place are common), users who have seen
    everything and nothing: the fill on the filtered inputs, its indices mapped back, is bit
    for bit the reference's top-k with disallowed and excluded items masked."""
    if impl.slow and I > 100:
        pytest.skip("the Triton interpreter: small shapes only")
    opts = CASES[case]
    rng = np.random.default_rng(U * 1000 + I)
    P, Q, bu, bi, mu, seen, mask = make_inputs(rng, U, I, full_users=(0,), empty_users=(1,))
    state = {"user_factors": P, "item_factors": Q, "user_bias": bu, "item_bias": bi,
             "global_mean": torch.tensor(mu)}
    kw, ref_mask = {}, mask.copy()
    if opts.get("allow"):
        kw["allow"] = rng.choice(I, size=max(1, (2 * I) // 3), replace=False)
        ref_mask[:, np.setdiff1d(np.arange(I), kw["allow"])] = True
    if opts.get("deny"):
        kw["deny"] = rng.choice(I, size=max(1, I // 4), replace=False)
        ref_mask[:, kw["deny"]] = True
    if opts.get("exclude"):
        n = 3 * U
        eu, ei = rng.integers(0, U, n), rng.integers(0, I, n)
        kw["exclude"] = (torch.from_numpy(eu), torch.from_numpy(ei))
        ref_mask[eu, ei] = True
    fstate, _, fseen, allowed = filter_fill_inputs(state, None, seen, **kw)
    n_sub = fstate["item_factors"].shape[0]
    kk = min(k, n_sub)
    s, i = impl.fill(fstate["user_factors"], fstate["item_factors"], fstate["user_bias"],
                     fstate["item_bias"], mu, kk, fseen)
    if allowed is not None:
        i = expand_items(i, allowed)
    want = topk_reference(P, Q, bu, bi, mu, kk, csr_from_mask(ref_mask))
    assert_topk_exact((s, i), want)


# --------------------------------------------------------------------------- the CLI

def write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path, n_users=30, n_items=25)


def expected(run, tmp_path, k, *, allow=(), deny=(), pairs=(), seen=True):
    from svdfill.checkpoint import load_model

    m = load_model(run)
    mask = np.load(tmp_path / "seen_mask.npy").copy()
    if not seen:
        mask[:] = False
    ids = list(m.idmap.item_ids)
    if allow:
        mask[:, [j for j in range(len(ids)) if ids[j] not in set(allow)]] = True
    for r in deny:
        mask[:, ids.index(r)] = True
    users = list(m.idmap.user_ids)
    for u, it in pairs:
        mask[users.index(u), ids.index(it)] = True
    return reference(run, k, mask)


def same_rows(got, ref):
    assert [(u, i, r) for u, i, _, r in got] == [(u, i, r) for u, i, _, r in ref]
    np.testing.assert_array_equal(np.array([g[2] for g in got], dtype=np.float32),
                                  np.array([r[2] for r in ref], dtype=np.float32))


def test_cli_allow_deny_exclude_write_the_masked_reference(run, tmp_path):
    allow = ["m001", "m003", "m004", "m010", "m011", "m017", "m020", "m024"]
    deny = ["m004", "m020"]
    pairs = [(1003, "m001"), (1006, "m010"), (1006, "m024"), (1087, "m003")]
    fa = write(tmp_path / "allow.txt", "# the allowed items", *allow)
    fd = write(tmp_path / "deny.txt", *deny, "", "# end")
    fe = write(tmp_path / "ex.tsv", "# user\titem", *[f"{u}\t{i}" if j % 2 else f"{u},{i}"
                                                     for j, (u, i) in enumerate(pairs)])
    base = ("--model", str(run), "--k", "5", "--user-block", "7", "--quiet")
    for name, opts, kw in [
        ("allow", ["--items-allow", fa], dict(allow=allow)),
        ("deny", ["--items-deny", fd], dict(deny=deny)),
        ("exclude", ["--exclude", fe], dict(pairs=pairs)),
        ("all", ["--items-allow", fa, "--items-deny", fd, "--exclude", fe],
         dict(allow=allow, deny=deny, pairs=pairs)),
    ]:
        out = tmp_path / f"{name}.parquet"
        assert fill(*base, "--out", str(out), *opts) == 0
        same_rows(rows_of(out), expected(run, tmp_path, 5, **kw))
        md = pq.ParquetFile(out).schema_arrow.metadata
        assert (b"svdfill.items_allow_sha256" in md) == ("--items-allow" in opts)
        assert (b"svdfill.exclude_sha256" in md) == ("--exclude" in opts)
    # --no-exclude-seen: the exclusions alone
    out = tmp_path / "noseen.parquet"
    assert fill(*base, "--out", str(out), "--exclude", fe, "--no-exclude-seen") == 0
    same_rows(rows_of(out), expected(run, tmp_path, 5, pairs=pairs, seen=False))
    # the partitioned dataset: the same rows in its parts
    ds = tmp_path / "ds"
    assert fill(*base, "--out", str(ds) + "/", "--items-allow", fa, "--items-deny", fd, "--exclude", fe) == 0
    got = [r for p in sorted(ds.glob("part-*.parquet")) for r in rows_of(p)]
    same_rows(got, expected(run, tmp_path, 5, allow=allow, deny=deny, pairs=pairs))


def test_cli_k_beyond_the_allowed_items_pads(run, tmp_path, capsys):
    fa = write(tmp_path / "allow.txt", "m002", "m007", "m009")
    out = tmp_path / "recs.parquet"
    assert fill("--model", str(run), "--k", "6", "--out", str(out), "--items-allow", fa) == 0
    assert "using k = 3" in capsys.readouterr().err
    got = rows_of(out)
    same_rows(got, expected(run, tmp_path, 3, allow=["m002", "m007", "m009"]))
    assert max(r for *_, r in got) <= 3


def test_cli_no_filter_output_is_unchanged(run, tmp_path):
    """Without filters the file is the one made before the filters existed: the same bytes
    as a second plain run, and none of the filter metadata."""
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        assert fill("--model", str(run), "--k", "4", "--out", str(out), "--quiet") == 0
    assert a.read_bytes() == b.read_bytes()
    md = pq.ParquetFile(a).schema_arrow.metadata
    assert not any(key.startswith((b"svdfill.items_", b"svdfill.exclude_sha")) for key in md)
    same_rows(rows_of(a), expected(run, tmp_path, 4))


def test_cli_unknown_item_names_file_and_line_or_is_skipped(run, tmp_path, capsys):
    out = str(tmp_path / "recs.parquet")
    fa = write(tmp_path / "allow.txt", "m001", "# c", "nope", "m002")
    assert fill("--model", str(run), "--k", "3", "--out", out, "--items-allow", fa) != 0
    err = capsys.readouterr().err
    assert f"{fa}:3: 1 item id(s) not in the model: 'nope' (line 3)" in err and "--skip-unknown" in err
    fe = write(tmp_path / "ex.csv", "1003,m001", "1003,zzz")
    assert fill("--model", str(run), "--k", "3", "--out", out, "--exclude", fe) != 0
    assert f"{fe}:2: item id 'zzz' not in the model" in capsys.readouterr().err
    fe2 = write(tmp_path / "ex2.csv", "1003,m001", "7,m002")
    assert fill("--model", str(run), "--k", "3", "--out", out, "--exclude", fe2) != 0
    assert f"{fe2}:2: user id 7 not in the model" in capsys.readouterr().err
    bad = write(tmp_path / "bad.csv", "1003 m001")
    assert fill("--model", str(run), "--k", "3", "--out", out, "--exclude", bad) != 0
    assert f"{bad}:1: expected 'user_id<TAB or comma>item_id'" in capsys.readouterr().err
    assert not (tmp_path / "recs.parquet").exists()

    assert fill("--model", str(run), "--k", "3", "--out", out, "--items-allow", fa, "--exclude", fe2,
                "--skip-unknown", "--quiet") == 0
    err = capsys.readouterr().err
    assert "1 item id(s) not in the model skipped" in err and "1 pair(s) with ids not in the model skipped" in err
    same_rows(rows_of(tmp_path / "recs.parquet"),
              expected(run, tmp_path, 3, allow=["m001", "m002"], pairs=[(1003, "m001")]))


def test_cli_resume_with_other_filters_is_refused(run, tmp_path, monkeypatch, capsys):
    """The filter files' hashes key the resume: an unfinished export made with another
    allow list is not resumed with this one."""
    from svdfill.launch import cmd_fill
    from test_cli_fill import parse

    fa = write(tmp_path / "allow.txt", "m001", "m002", "m003")
    out = tmp_path / "recs.parquet"
    calls = {"n": 0}

    # stop the first export after its first block (as a kill would), keeping the partial
    from svdfill.data import export as dx

    orig = dx.ResumableParquetWriter.write_block

    def write_block(self, b, table):
        orig(self, b, table)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(dx.ResumableParquetWriter, "write_block", write_block)
    with pytest.raises(KeyboardInterrupt):
        cmd_fill.main(parse("--model", str(run), "--k", "2", "--out", str(out), "--user-block", "5", "--quiet",
                   "--items-allow", fa))
    monkeypatch.setattr(dx.ResumableParquetWriter, "write_block", orig)
    write(tmp_path / "allow.txt", "m001", "m002", "m004")
    args = ("--model", str(run), "--k", "2", "--out", str(out), "--user-block", "5", "--quiet",
            "--items-allow", fa)
    assert fill(*args) != 0
    err = capsys.readouterr().err
    assert "different parameters" in err and "items_allow_sha256" in err and "--restart" in err
    assert fill(*args, "--restart") == 0
    same_rows(rows_of(out), expected(run, tmp_path, 2, allow=["m001", "m002", "m004"]))


@pytest.mark.multiprocess
def test_torchrun_w2_filtered_fill_equals_one_process(run, tmp_path):
    """torchrun, 2 item shards: rank 0 writes the file (ranks > 0 load and filter the model
    themselves) and every rank writes its part of a dataset; both equal the one-process
    filtered fill. With --no-exclude-seen the exclusions alone are dropped on every rank."""
    from test_torchrun import torchrun

    fa = write(tmp_path / "allow.txt", *[f"m{i:03d}" for i in range(0, 25, 2)])
    fd = write(tmp_path / "deny.txt", "m004")
    fe = write(tmp_path / "ex.csv", "1003,m002", "1006,m006", "1006,m008")
    opts = ["--k", "4", "--user-block", "7", "--quiet", "--items-allow", fa, "--items-deny", fd,
            "--exclude", fe, "--device", "cpu"]
    for extra in ([], ["--no-exclude-seen"]):
        ref = tmp_path / "one.parquet"
        assert fill("--model", str(run), "--out", str(ref), *opts, *extra) == 0
        got = tmp_path / "w2.parquet"
        torchrun("svdfill.launch.torchrun_fill", "--model", run, "--out", got, *opts, *extra)
        assert rows_of(got) == rows_of(ref)
        ds = tmp_path / "ds"
        torchrun("svdfill.launch.torchrun_fill", "--model", run, "--out", f"{ds}/", *opts, *extra)
        assert [r for p in sorted(ds.glob("part-*.parquet")) for r in rows_of(p)] == rows_of(ref)
        for p in (ref, got):
            p.unlink()
        import shutil

        shutil.rmtree(ds)
