"""`svdfill fill --out DIR/`: the partitioned Parquet dataset (fill.dataset). One process
writes one part equal to the single file row for row; torchrun W=2 (the real launcher, gloo
on 127.0.0.1) writes two parts, each by its own rank, whose union is the single file;
kill -9 of one rank leaves no manifest and a rerun finishes a byte-identical dataset; a rerun
with another number of ranks, a folder holding other files or a file as folder are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from svdfill.data.export import ExportError
from svdfill.fill.dataset import MANIFEST, block_owner, part_blocks, read_manifest
from svdfill.launch import cmd_fill
from test_cli_fill import fill, make_run, parse
from test_torchrun import TORCHRUN, _env, torchrun

U, I, BLOCK = 150, 40, 10  # 15 user blocks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("dataset"), n_users=U, n_items=I)


def args(run: Path, out) -> list[str]:
    return ["--model", str(run), "--k", "6", "--user-block", str(BLOCK), "--quiet", "--out", str(out)]


def fill_raising(*argv: str) -> int:
    """``svdfill fill`` letting its error out (to match the message)."""
    return cmd_fill.main(parse(*argv))


def svdfill_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"svdfill.")}


def dataset_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_part_ranges_are_contiguous_and_match_the_owner_rule():
    for n_blocks in (1, 2, 3, 7, 15, 100):
        for parts in (1, 2, 3, 4, 8):
            ranges = [part_blocks(p, parts, n_blocks) for p in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_blocks
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            for p, (lo, hi) in enumerate(ranges):
                assert all(block_owner(b, parts, n_blocks) == p for b in range(lo, hi))


def test_one_process_dataset_equals_the_single_file(run, tmp_path):
    single, out = tmp_path / "one.parquet", tmp_path / "ds"
    assert fill(*args(run, single)) == 0
    assert fill(*args(run, f"{out}/")) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet"]
    part = out / "part-00000.parquet"
    ref, got = pq.read_table(single), pads.dataset(out, format="parquet").to_table()
    assert got.equals(ref) and got.num_rows > 0  # row for row; _manifest.json is skipped
    # same row groups, same metadata plus the part's own keys
    assert [pq.ParquetFile(part).metadata.row_group(g).num_rows for g in range(U // BLOCK)] == \
        [pq.ParquetFile(single).metadata.row_group(g).num_rows for g in range(U // BLOCK)]
    assert svdfill_meta(part) == dict(svdfill_meta(single), **{
        "svdfill.part": "0", "svdfill.parts": "1", "svdfill.blocks": f"0:{U // BLOCK}"})
    m = read_manifest(out)
    assert m["format"] == "svdfill-fill-dataset/1" and m["k"] == 6 and m["n_users"] == U
    assert m["n_items"] == I and m["rows"] == ref.num_rows
    assert m["model_sha256"] == svdfill_meta(single)["svdfill.model_sha256"]
    (p0,) = m["parts"]
    assert p0["file"] == part.name and (p0["first_block"], p0["last_block"]) == (0, U // BLOCK - 1)
    assert p0["rows"] == ref.num_rows and p0["bytes"] == part.stat().st_size and p0["rank"] == 0
    # the existing folder (no trailing /) is a dataset too; the finished part is kept as is
    before = dataset_files(out)
    assert fill(*args(run, out)) == 0
    assert dataset_files(out) == before


def test_bad_folders_are_refused_naming_the_path(run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match=r"busy/: holds files that are not part of an svdfill dataset \(notes.txt\)"):
        fill_raising(*args(run, f"{busy}/"))
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ExportError, match="afile/: is a file, not a folder"):
        fill_raising(*args(run, f"{f}/"))
    with pytest.raises(ExportError, match="does not exist"):
        fill_raising(*args(run, f"{tmp_path}/no/such/"))


def torchrun_fill(run: Path, out: str, *, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--rdzv-endpoint=127.0.0.1:0",
           "-m", "svdfill.launch.torchrun_fill", *args(run, out)]
    return subprocess.run(cmd, env=dict(_env(), **(env or {})), capture_output=True, text=True, timeout=240)


@pytest.mark.multiprocess
def test_torchrun_w2_parts_kill9_resume_and_another_w_refused(run, tmp_path):
    single, clean = tmp_path / "one.parquet", tmp_path / "clean"
    assert fill(*args(run, single)) == 0
    torchrun("svdfill.launch.torchrun_fill", *args(run, f"{clean}/"))
    assert sorted(p.name for p in clean.iterdir()) == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    ref = pq.read_table(single)
    got = pads.dataset(clean, format="parquet").to_table()
    # a small item table is replicated (--item-split auto): each rank fills its own users
    # over every item, the same computation as one process, so the same bits
    assert got.num_rows == ref.num_rows and got.equals(ref)
    m = read_manifest(clean)
    assert [(p["file"], p["rank"], p["first_block"], p["last_block"]) for p in m["parts"]] == \
        [("part-00000.parquet", 0, 0, 7), ("part-00001.parquet", 1, 8, 14)]  # 15 blocks: b*2//15
    assert sum(p["rows"] for p in m["parts"]) == m["rows"] == ref.num_rows
    for p in m["parts"]:
        meta = svdfill_meta(clean / p["file"])
        assert meta["svdfill.part"] == str(p["rank"]) and meta["svdfill.parts"] == "2"
        assert meta["svdfill.blocks"] == f"{p['first_block']}:{p['last_block'] + 1}"
        assert pq.ParquetFile(clean / p["file"]).metadata.num_row_groups == p["last_block"] - p["first_block"] + 1

    # kill -9 of rank 1 after it wrote global block 10 (its third): no manifest, parts missing
    out = tmp_path / "ds"
    r = torchrun_fill(run, f"{out}/", env={"SVDFILL_TEST_KILL_AFTER_BLOCK": "10@1"})
    assert r.returncode != 0, r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert MANIFEST not in names and "part-00001.parquet" not in names, names
    assert sorted(x.name for x in (out / ".part-00001.parquet.partial").glob("block-*.arrow")) == \
        [f"block-{j:06d}.arrow" for j in range(3)]

    # another number of ranks cannot resume it (the block ranges differ): refused, folder kept
    with pytest.raises(ExportError, match=r"ds/: an unfinished dataset written by 2 writer\(s\).*--restart"):
        fill_raising(*args(run, f"{out}/"))
    assert sorted(p.name for p in out.iterdir()) == names

    r = torchrun_fill(run, f"{out}/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert dataset_files(out) == dataset_files(clean)  # parts and manifest byte for byte

    # --item-split shard: every rank computes every block over its half of the items and
    # the owner merges the two lists: the same rows (scores up to GEMM rounding of another shape)
    sharded = tmp_path / "sharded"
    torchrun("svdfill.launch.torchrun_fill", *args(run, f"{sharded}/"), "--item-split=shard")
    got = pads.dataset(sharded, format="parquet").to_table()
    assert got.num_rows == ref.num_rows
    for col in ("user_id", "item_id", "rank"):
        assert got.column(col).equals(ref.column(col)), col
    np.testing.assert_allclose(got.column("score").to_numpy(), ref.column("score").to_numpy(), rtol=1e-6)
    assert [p["rows"] for p in read_manifest(sharded)["parts"]] == [p["rows"] for p in m["parts"]]

    # --restart with one process: the old parts go, one part and its manifest remain
    assert fill(*args(run, f"{out}/"), "--restart") == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet"]
    assert pads.dataset(out, format="parquet").to_table().equals(ref)


# ------------------------------------------------------------------- the grid layout's parts
# fill.dataset.export_grid_dataset: rank r writes its own user block's part from the ring
# fill (fill.grid_fill); the parts read back are the single file row for row.

G_U, G_I, G_K, G_BLOCK = 29, 17, 5, 4
G_BOUNDS = {1: ([(0, G_U)], [(0, G_I)]),
            3: ([(0, 11), (11, 11), (11, G_U)], [(0, 6), (6, 7), (7, G_I)])}


def grid_model():
    import torch

    from reference import dyadic, random_csr
    from svdfill.data.idmap import IdMap

    g = torch.Generator().manual_seed(5)
    st = {"user_factors": dyadic((G_U, 3), g, scale=1, lo=-2, hi=3),
          "item_factors": dyadic((G_I, 3), g, scale=1, lo=-2, hi=3),
          "user_bias": dyadic((G_U,), g), "item_bias": dyadic((G_I,), g),
          "global_mean": torch.tensor(3.25)}
    st["item_factors"][6], st["item_bias"][6] = st["item_factors"][5], st["item_bias"][5]  # a tie
    seen = random_csr(G_U, G_I, torch.Generator().manual_seed(6), full_rows=(2,))
    idmap = IdMap(np.arange(G_U, dtype=np.int64) * 10 + 7, np.arange(G_I, dtype=np.int64) + 100)
    return st, seen, idmap


def _grid_export_rank(rank, W, out):
    from types import SimpleNamespace

    import torch

    from svdfill.distributed.ring import Ring
    from svdfill.distributed.world import DistWorld, World
    from svdfill.fill.dataset import export_grid_dataset
    from svdfill.kernels.topk import csr_slice

    st, seen, idmap = grid_model()
    ub, ib = G_BOUNDS[W]
    (u_lo, u_hi), (i_lo, i_hi) = ub[rank], ib[rank]
    tables = {"user_factors": st["user_factors"][u_lo:u_hi], "user_bias": st["user_bias"][u_lo:u_hi],
              "item_factors": st["item_factors"][i_lo:i_hi], "item_bias": st["item_bias"][i_lo:i_hi],
              "global_mean": st["global_mean"]}
    if W > 1:
        import torch.distributed as dist

        def all_gather(obj):
            box = [None] * W
            dist.all_gather_object(box, obj)
            return box
    else:
        def all_gather(obj):
            return [obj]
    ring = Ring(DistWorld(rank, W, torch.device("cpu"), "gloo") if W > 1 else World())
    layout = SimpleNamespace(n_users=G_U, n_items=G_I, user_bounds=ub, item_bounds=ib)
    return export_grid_dataset(tables, idmap, out, layout=layout, rank=rank, ring=ring,
                               all_gather=all_gather, k=G_K, seen=csr_slice(*seen, u_lo, u_hi),
                               user_block=G_BLOCK, quiet=True)


def single_file(tmp_path):
    from svdfill.fill.export import export_fill

    st, seen, idmap = grid_model()
    path = tmp_path / "single.parquet"
    export_fill(st, idmap, path, k=G_K, seen=seen, user_block=G_BLOCK, quiet=True)
    return pq.read_table(path)


def rows_of_users(ref, lo: int, hi: int) -> int:
    """Rows of the single file for contiguous users [lo, hi) (raw id = 10·u + 7)."""
    u = (ref.column("user_id").to_numpy() - 7) // 10
    return int(((u >= lo) & (u < hi)).sum())


def check_grid_dataset(out: Path, W: int, ref) -> None:
    got = pads.dataset(out, format="parquet").to_table()
    assert got.num_rows == ref.num_rows > 0 and got.equals(ref)  # row for row, ties included
    m = read_manifest(out)
    assert [p["users"] for p in m["parts"]] == [list(b) for b in G_BOUNDS[W][0]]
    assert [p["rank"] for p in m["parts"]] == list(range(W))
    assert m["rows"] == ref.num_rows and m["n_users"] == G_U and m["k"] == G_K
    for p in m["parts"]:
        assert p["rows"] == rows_of_users(ref, *p["users"])
        assert p["rows"] == pq.ParquetFile(out / p["file"]).metadata.num_rows


def test_grid_one_process_equals_single_file_and_resumes(tmp_path, monkeypatch):
    import svdfill.fill.dataset as ds

    ref = single_file(tmp_path)
    out = tmp_path / "grid"

    def killed(b, rank=0):
        if b == 2:
            raise KeyboardInterrupt  # the process dies after its third block is on disk
    monkeypatch.setattr(ds, "_test_kill_hook", killed)
    with pytest.raises(KeyboardInterrupt):
        _grid_export_rank(0, 1, f"{out}/")
    assert not (out / MANIFEST).exists()
    monkeypatch.undo()
    s = _grid_export_rank(0, 1, f"{out}/")
    assert s["resumed_blocks"] == 3 and s["rows_computed"] == rows_of_users(ref, 3 * G_BLOCK, G_U)
    check_grid_dataset(out, 1, ref)


@pytest.mark.multiprocess
def test_grid_three_ranks_each_write_their_users(tmp_path):
    from multiprocess_harness import run_ranks

    ref = single_file(tmp_path)
    out = tmp_path / "grid3"
    sums = run_ranks(_grid_export_rank, 3, f"{out}/")
    check_grid_dataset(out, 3, ref)
    d = 3
    for s in sums:  # every item block passes each rank once: Q rows and b_i
        assert s["ring_bytes_sent"] == G_I * (d + 1) * 4
    assert [s["rows_computed"] for s in sums] == [rows_of_users(ref, *b) for b in G_BOUNDS[3][0]]
