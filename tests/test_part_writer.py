"""fill/part_writer.py: one part written on its own equals the part the collective export
writes for that rank, and resumes at its first unfinished block after a failure."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from svdfill.fill.dataset import export_dataset
from svdfill.fill.export import plan_fill
from svdfill.fill.part_writer import part_layout, write_part
from test_publish import _run


def _model(tmp_path):
    from svdfill.checkpoint import load_model, load_seen

    run = _run(tmp_path, n_users=70, n_items=23)
    m = load_model(run)
    return m.state, m.idmap, load_seen(run)["all"]


def test_parts_written_alone_equal_the_one_process_dataset(tmp_path):
    state, idmap, seen = _model(tmp_path)
    kw = dict(k=4, seen=seen, device="cpu", user_block=9)
    ref = tmp_path / "ref"
    export_dataset(state, idmap, f"{ref}/", quiet=True, **kw)  # one writer: part 0 holds all
    plan = plan_fill(state, idmap, **kw)
    out = tmp_path / "alone"
    out.mkdir()
    infos = [write_part(plan, out, r, 3, plan.compute) for r in range(3)]
    assert [(i["first_block"], i["last_block"]) for i in infos] == [(0, 2), (3, 5), (6, 7)]
    got = pq.ParquetDataset(sorted(out.glob("part-*.parquet"))).read()
    assert got.equals(pq.read_table(ref / "part-00000.parquet"))
    lay = part_layout(plan, 1, 3)
    assert pq.read_schema(out / "part-00001.parquet").metadata == lay.schema.metadata
    assert lay.schema.metadata[b"svdfill.blocks"] == b"3:6"


def test_a_failed_part_resumes_at_its_first_unfinished_block(tmp_path):
    state, idmap, seen = _model(tmp_path)
    plan = plan_fill(state, idmap, k=3, seen=seen, device="cpu", user_block=7)  # 10 blocks
    out = tmp_path / "ds"
    out.mkdir()
    asked = []

    def failing(b):
        asked.append(b)
        if b == 7:
            raise RuntimeError("worker lost")
        return plan.compute(b)

    with pytest.raises(RuntimeError, match="worker lost"):
        write_part(plan, out, 1, 2, failing)  # part 1 = blocks 5..9
    assert not (out / "part-00001.parquet").exists()
    asked.clear()
    info = write_part(plan, out, 1, 2, lambda b: (asked.append(b), plan.compute(b))[1])
    # block 5 was written; block 6's write may have been in flight (then cancelled) at the failure
    assert asked[0] in (6, 7) and asked == list(range(asked[0], 10))
    assert info["resumed_blocks"] == asked[0] - 5
    ref = tmp_path / "ref"
    ref.mkdir()
    write_part(plan, ref, 1, 2, plan.compute)
    assert (out / "part-00001.parquet").read_bytes() == (ref / "part-00001.parquet").read_bytes()
    again = write_part(plan, out, 1, 2, lambda b: pytest.fail("a finished part is kept"))
    assert again["sha256"] == info["sha256"]
