"""`svdfill fill --out DIR/`: the partitioned Parquet dataset (fill.dataset). One process
writes one part equal to the single file row for row; torchrun W=2 (the real launcher, gloo
on 127.0.0.1) writes two parts, each by its own rank, whose union is the single file;
kill -9 of one rank leaves no manifest and a rerun finishes a byte-identical dataset; a rerun
with another number of ranks, a folder holding other files or a file as folder are refused."""

from __future__ import annotations

import json
import os
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
    assert got.num_rows == ref.num_rows
    for col in ("user_id", "item_id", "rank"):
        assert got.column(col).equals(ref.column(col)), col
    np.testing.assert_allclose(got.column("score").to_numpy(), ref.column("score").to_numpy(), rtol=1e-6)
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

    # --restart with one process: the old parts go, one part and its manifest remain
    assert fill(*args(run, f"{out}/"), "--restart") == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-00000.parquet"]
    assert pads.dataset(out, format="parquet").to_table().equals(ref)
