"""fill.grid_fill: the ring fill (item blocks visiting each rank's user block, running top-k
merged per visit) equals the float64 brute force and the one-process fill_topk bit for bit,
ties included (duplicate items on both sides of block borders), at W = 1, 2, 3 with ragged
and empty blocks, seen items excluded; each rank sends every item block once."""

from __future__ import annotations

import pytest
import torch

from multiprocess_harness import run_ranks
from reference import assert_topk_exact, dyadic, random_csr, topk_reference
from svdfill.distributed.ring import Ring
from svdfill.distributed.world import DistWorld, World
from svdfill.fill.grid_fill import grid_topk
from svdfill.kernels.fill import fill_topk
from svdfill.kernels.topk import csr_slice

U, I, D = 37, 23, 4
BOUNDS = {1: ([(0, U)], [(0, I)]),
          2: ([(0, 20), (20, U)], [(0, 1), (1, I)]),
          3: ([(0, 12), (12, 12), (12, U)], [(0, 10), (10, 11), (11, I)])}
TWINS = [(9, 10), (10, 11), (0, 1), (3, 15), (2, 22)]  # (a, b): item b scores as item a


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = dyadic((I, D), g, scale=1, lo=-2, hi=3)
    bi = dyadic((I,), g)
    for a, b in TWINS:  # ties across the block borders of every W above
        Q[b], bi[b] = Q[a], bi[a]
    return {"user_factors": dyadic((U, D), g, scale=1, lo=-2, hi=3), "item_factors": Q,
            "user_bias": dyadic((U,), g), "item_bias": bi, "global_mean": 3.5}


def seen_csr():
    return random_csr(U, I, torch.Generator().manual_seed(1), full_rows=(7,), empty_rows=(3,))


def _grid_rank(rank, W, k, with_seen):
    return _grid_cases(rank, W, [(k, with_seen)])[0]


def _grid_cases(rank, W, cases):
    return [_one_case(rank, W, k, with_seen) for k, with_seen in cases]


def _one_case(rank, W, k, with_seen):
    st = state()
    (u_lo, u_hi), (i_lo, i_hi) = BOUNDS[W][0][rank], BOUNDS[W][1][rank]
    seen = csr_slice(*seen_csr(), u_lo, u_hi) if with_seen else None
    ring = Ring(DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World())
    s, i = grid_topk(st["user_factors"][u_lo:u_hi], st["user_bias"][u_lo:u_hi],
                     st["item_factors"][i_lo:i_hi], st["item_bias"][i_lo:i_hi], i_lo,
                     BOUNDS[W][1], st["global_mean"], k, seen, ring)
    return s.numpy(), i.numpy(), ring.bytes_sent


def check(W, results, k, with_seen):
    st = state()
    seen = seen_csr() if with_seen else None
    ref = topk_reference(st["user_factors"], st["item_factors"], st["user_bias"],
                         st["item_bias"], st["global_mean"], k, seen)
    one = fill_topk(st["user_factors"], st["item_factors"], st["user_bias"], st["item_bias"],
                    st["global_mean"], k, seen)
    s = torch.cat([torch.from_numpy(r[0]) for r in results])
    i = torch.cat([torch.from_numpy(r[1]) for r in results])
    assert s.shape == (U, k)
    assert_topk_exact((s, i), ref)
    assert torch.equal(s, one[0]) and torch.equal(i, one[1])
    # the ties are really there: some user ranks a twin pair next to each other
    pairs = {tuple(sorted(p)) for p in TWINS}
    adjacent = {tuple(sorted((int(a), int(b)))) for row in i for a, b in zip(row[:-1], row[1:])}
    assert pairs & adjacent
    if W > 1:  # every item block passes through every rank once
        for _, _, sent in results:
            assert sent == I * (D + 1) * 4


@pytest.mark.parametrize("k,with_seen", [(5, True), (I + 3, True), (8, False)])
def test_one_process(k, with_seen):
    check(1, [_grid_rank(0, 1, k, with_seen)], k, with_seen)


@pytest.mark.multiprocess
@pytest.mark.parametrize("W", [2, 3])
def test_ring_fill_equals_one_process_fill(W):
    cases = [(5, True), (I + 3, False)]
    per_rank = run_ranks(_grid_cases, W, cases)
    for c, (k, with_seen) in enumerate(cases):
        check(W, [r[c] for r in per_rank], k, with_seen)


# ---------------------------------------------------------- `svdfill fill` on a grid run
# launch.fill_grid: a grid model folder (saved at W = 3) filled by one process and by
# torchrun at W = 2 (re-blocked on load) gives the one-process export of the same model.

def write_grid_model(folder, W=3):
    from svdfill import checkpoint as ck
    from svdfill.data.csr import build_csr
    from svdfill.data.idmap import IdMap
    from svdfill.distributed import grid_checkpoint as gck
    from svdfill.distributed.grid import GridLayout

    st, seen = state(), seen_csr()
    ub, ib = BOUNDS[W]
    layout = GridLayout(U, I, ub, ib)
    for r in range(W):
        (a, b), (c, d) = ub[r], ib[r]
        gck.save_grid_model(folder, "model", layout, r, {
            "user_factors": st["user_factors"][a:b], "user_bias": st["user_bias"][a:b],
            "item_factors": st["item_factors"][c:d], "item_bias": st["item_bias"][c:d]})
        rows = torch.repeat_interleave(torch.arange(U), seen[0][1:] - seen[0][:-1])
        m = (rows >= a) & (rows < b)
        ip, ix = build_csr(rows[m] - a, seen[1].long()[m], b - a)
        ck.atomic_torch_save(folder / gck.rank_file("seen", r, W),
                             {"user_lo": torch.tensor(a), "train_indptr": ip, "train_indices": ix,
                              "all_indptr": ip, "all_indices": ix})
    import numpy as np

    idmap = IdMap(np.arange(U, dtype=np.int64) * 3 + 1, np.arange(I, dtype=np.int64) + 500)
    ck.atomic_torch_save(folder / "idmap.pt", idmap.to_state())
    gck.write_layout(folder, layout, {"factors": D, "global_mean": st["global_mean"],
                                      "n_users": U, "n_items": I, "idmap": "idmap.pt",
                                      "config": {"fill": {"k": 4}}}, names=["model"])
    return st, seen, idmap


@pytest.mark.multiprocess
def test_svdfill_fill_on_a_grid_run(tmp_path):
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.fill.export import export_fill
    from svdfill.launch.errors import UserError
    from test_cli_fill import parse
    from test_torchrun import torchrun
    from svdfill.launch import cmd_fill

    run = tmp_path / "run"
    st, seen, idmap = write_grid_model(run / "grid_model")
    export_fill(st, idmap, tmp_path / "one.parquet", k=6, seen=seen, user_block=5, quiet=True)
    ref = pq.read_table(tmp_path / "one.parquet")
    common = ["--model", str(run), "--k", "6", "--user-block", "5", "--quiet"]
    assert cmd_fill.main(parse(*common, "--out", f"{tmp_path / 'w1'}/")) == 0
    torchrun("svdfill.launch.torchrun_fill", *common, "--out", f"{tmp_path / 'w2'}/", nproc=2)
    for name, parts in (("w1", 1), ("w2", 2)):
        got = pads.dataset(tmp_path / name, format="parquet").to_table()
        assert got.num_rows == ref.num_rows > 0 and got.equals(ref), name
        assert len(list((tmp_path / name).glob("part-*.parquet"))) == parts
    with pytest.raises(UserError, match="dataset folder"):
        cmd_fill.main(parse(*common, "--out", str(tmp_path / "one-file.parquet")))


@pytest.mark.multiprocess
def test_item_filters_on_a_grid_run_equal_the_one_process_filtered_fill(tmp_path):
    """--items-deny / --items-allow / --exclude on a grid model (one process, and torchrun
    at W = 2 re-blocking the W = 3 model): the rows of the one-process filtered export."""
    import numpy as np
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.fill.export import export_fill
    from svdfill.fill.filters import filter_fill_inputs
    from svdfill.launch import cmd_fill
    from svdfill.launch.errors import UserError
    from test_cli_fill import parse
    from test_torchrun import torchrun

    run = tmp_path / "run"
    st, seen, idmap = write_grid_model(run / "grid_model")
    raw_u, raw_i = idmap.user_ids, idmap.item_ids
    deny, allow = [2, 5, 11], list(range(1, I, 2))
    excl = [(0, 3), (4, 0), (U - 1, I - 1), (7, 3)]
    (tmp_path / "deny.txt").write_text("".join(f"{raw_i[j]}\n" for j in deny))
    (tmp_path / "allow.txt").write_text("# odd items\n" + "".join(f"{raw_i[j]}\n" for j in allow))
    (tmp_path / "excl.tsv").write_text("".join(f"{raw_u[u]}\t{raw_i[j]}\n" for u, j in excl))
    exclude = (torch.tensor([u for u, _ in excl]), torch.tensor([j for _, j in excl]))
    common = ["--model", str(run), "--k", "6", "--user-block", "5", "--quiet"]
    cases = {"deny": (["--items-deny", str(tmp_path / "deny.txt"), "--exclude", str(tmp_path / "excl.tsv")],
                      dict(deny=np.array(deny), exclude=exclude)),
             "allow": (["--items-allow", str(tmp_path / "allow.txt")], dict(allow=np.array(allow)))}
    for name, (opts, kw) in cases.items():
        fst, fmap, fseen, _ = filter_fill_inputs(st, idmap, seen, **kw)
        export_fill(fst, fmap, tmp_path / f"{name}.parquet", k=6, seen=fseen, user_block=5, quiet=True)
        ref = pq.read_table(tmp_path / f"{name}.parquet")
        assert cmd_fill.main(parse(*common, *opts, "--out", f"{tmp_path / name}-w1/")) == 0
        torchrun("svdfill.launch.torchrun_fill", *common, *opts, "--out", f"{tmp_path / name}-w2/", nproc=2)
        for out in (f"{name}-w1", f"{name}-w2"):
            got = pads.dataset(tmp_path / out, format="parquet").to_table()
            assert got.num_rows == ref.num_rows > 0, out
            for col in ("user_id", "item_id", "score", "rank"):
                assert got.column(col).equals(ref.column(col)), (out, col)
        items = set(got.column("item_id").to_pylist())
        if name == "deny":
            assert not items & {int(raw_i[j]) for j in deny}
        else:
            assert items <= {int(raw_i[j]) for j in allow}
    (tmp_path / "none.txt").write_text(f"{raw_i[0]}\n")
    with pytest.raises(UserError, match="no item to fill"):
        cmd_fill.main(parse(*common, "--items-allow", str(tmp_path / "none.txt"),
                            "--items-deny", str(tmp_path / "none.txt"), "--out", f"{tmp_path / 'x'}/"))


# ------------------------------------------------------------------ --users on a grid run
# Each rank keeps the listed users of its user block (list order) and scores only them: the
# dataset is the one-process `--users` fill's rows, grouped by user block (at W = 1: as is).

def _users_file(path, idmap, users):
    path.write_text("# listed users\n" + "".join(f"{idmap.user_ids[u]}\n" for u in users))
    return path


def _users_reference(tmp_path, st, seen, idmap, users_file, name):
    """The ordinary one-process `--users` export of the same model (export_fill, which
    `svdfill fill --users` runs on a one-table model)."""
    import pyarrow.parquet as pq

    from svdfill.fill.export import export_fill
    from svdfill.launch.cmd_fill import read_user_list

    sel = read_user_list(users_file, idmap)
    export_fill(st, idmap, tmp_path / f"{name}.parquet", k=6, seen=seen, users=sel,
                user_block=2, quiet=True)
    return pq.read_table(tmp_path / f"{name}.parquet"), sel


def _by_block(table, idmap, bounds):
    """``table``'s rows stably regrouped by the user block of their user."""
    import numpy as np

    raw = table.column("user_id").to_numpy()
    block = np.searchsorted([hi for _, hi in bounds], idmap.encode_users(raw), side="right")
    return table.take(np.argsort(block, kind="stable"))


# users from every block of W = 1, 2, 3, list order ≠ id order, a duplicate, a user who has
# seen every item (7: no rows) and one who has seen none (3)
LISTED = [30, 3, 7, 20, 3, 12, 0, 36, 18]


def test_users_on_a_grid_run_one_process(tmp_path, capsys, monkeypatch):
    """W = 1 (the model saved at W = 3): the one-process `--users` export, row for row, with
    the list's hash in the metadata; an unknown id is the ordinary fill's error; a killed
    export is resumed only with the same list; --full and --foldin stay refused."""
    import json

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.data.export import ExportError, ResumableParquetWriter
    from svdfill.launch import cmd_fill
    from svdfill.launch.errors import UserError
    from test_cli_fill import parse

    run = tmp_path / "run"
    st, seen, idmap = write_grid_model(run / "grid_model")
    ufile = _users_file(tmp_path / "users.txt", idmap, LISTED)
    ref, sel = _users_reference(tmp_path, st, seen, idmap, ufile, "one")
    assert len(sel) == 8 and ref.num_rows > 0
    common = ["--model", str(run), "--k", "6", "--user-block", "2", "--quiet"]
    import svdfill.fill.grid_fill as gf

    scored, real_topk = [], gf.grid_topk  # only the listed users (still to write) are scored
    monkeypatch.setattr(gf, "grid_topk",
                        lambda P, *a, **kw: scored.append(P.shape[0]) or real_topk(P, *a, **kw))
    out = tmp_path / "w1"
    assert cmd_fill.main(parse(*common, "--users", str(ufile), "--out", f"{out}/")) == 0
    assert "1 duplicate user id(s) ignored" in capsys.readouterr().err
    got = pads.dataset(out, format="parquet").to_table()
    assert got.equals(ref)
    md = pq.read_schema(out / "part-00000.parquet").metadata
    one_md = pq.read_schema(tmp_path / "one.parquet").metadata
    assert md[b"svdfill.users_sha256"] == one_md[b"svdfill.users_sha256"]
    man = json.loads((out / "_manifest.json").read_text())
    assert man["n_users"] == 8 and man["rows"] == ref.num_rows and man["n_blocks"] == 4

    # an unknown id: the ordinary fill's error, word for word
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{idmap.user_ids[0]}\n2\n")  # raw user ids are 3u + 1
    with pytest.raises(UserError) as ordinary:
        cmd_fill.read_user_list(bad, idmap)
    with pytest.raises(UserError) as grid:
        cmd_fill.main(parse(*common, "--users", str(bad), "--out", f"{tmp_path / 'bad'}/"))
    assert str(grid.value) == str(ordinary.value)
    assert "1 user id(s) not in the model: 2 (line 2)" in str(grid.value)

    # killed after block 0 (a write error at block 1): another list is refused, the same resumes
    real = ResumableParquetWriter.write_block

    def fail_at_1(self, b, table):
        if b == 1:
            raise OSError(28, "No space left on device")
        real(self, b, table)

    monkeypatch.setattr(ResumableParquetWriter, "write_block", fail_at_1)
    res = tmp_path / "res"
    with pytest.raises(ExportError, match="No space left"):
        cmd_fill.main(parse(*common, "--users", str(ufile), "--out", f"{res}/"))
    monkeypatch.setattr(ResumableParquetWriter, "write_block", real)
    other = _users_file(tmp_path / "other.txt", idmap, [0, 3, 7, 12, 18, 20, 30, 36])
    with pytest.raises(ExportError, match=r"different parameters.*svdfill\.users_sha256.*--restart"):
        cmd_fill.main(parse(*common, "--users", str(other), "--out", f"{res}/"))
    assert cmd_fill.main(parse(*common, "--users", str(ufile), "--out", f"{res}/")) == 0
    assert scored == [8, 8, 6]  # the full list twice, then the 3 blocks still to write
    assert pads.dataset(res, format="parquet").to_table().equals(ref)
    # the finished dataset, asked for with another list: rewritten for that list, nothing mixed
    assert cmd_fill.main(parse(*common, "--users", str(other), "--out", f"{res}/")) == 0
    ref2, _ = _users_reference(tmp_path, st, seen, idmap, other, "other")
    assert pads.dataset(res, format="parquet").to_table().equals(ref2)

    for opt in (["--full"], ["--foldin", str(ufile)]):
        with pytest.raises(UserError, match=f"{opt[0]} is not supported on a grid model"):
            cmd_fill.main(parse(*common, *opt, "--out", f"{tmp_path / 'x'}/"))


@pytest.mark.multiprocess
def test_users_on_a_grid_run_under_torchrun(tmp_path):
    """torchrun at W = 2 (re-blocking the W = 3 model): a list over both user blocks gives
    the one-process `--users` export grouped by block, each part holding only its block's
    listed users; a list entirely in rank 1's block leaves rank 0 an empty part."""
    import json

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from svdfill.distributed.grid import grid_bounds
    from test_torchrun import torchrun

    run = tmp_path / "run"
    st, seen, idmap = write_grid_model(run / "grid_model")
    bounds = grid_bounds(U, 2)  # [(0, 18), (18, 37)]
    common = ["--model", str(run), "--k", "6", "--user-block", "2", "--quiet"]
    cases = {"both": LISTED, "one": [33, 19, 25, 19, 36]}
    for name, listed in cases.items():
        ufile = _users_file(tmp_path / f"{name}.txt", idmap, listed)
        ref, sel = _users_reference(tmp_path, st, seen, idmap, ufile, name)
        torchrun("svdfill.launch.torchrun_fill", *common, "--users", str(ufile),
                 "--out", f"{tmp_path / name}-w2/", nproc=2)
        out = tmp_path / f"{name}-w2"
        got = pads.dataset(out, format="parquet").to_table()
        assert got.num_rows == ref.num_rows > 0, name
        assert got.equals(_by_block(ref, idmap, bounds)), name
        for r, (lo, hi) in enumerate(bounds):
            part = pq.read_table(out / f"part-{r:05d}.parquet")
            users = idmap.encode_users(part.column("user_id").to_numpy())
            assert ((users >= lo) & (users < hi)).all(), (name, r)
        man = json.loads((out / "_manifest.json").read_text())
        assert man["n_users"] == len(sel) and len(man["parts"]) == 2
        if name == "both":
            assert not got.equals(ref)  # the list interleaves the blocks: regrouped
        if name == "one":
            assert got.equals(ref)  # one block: the list order itself
            assert [p["rows"] for p in sorted(man["parts"], key=lambda p: p["rank"])][0] == 0
