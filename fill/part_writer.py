"""One part of a partitioned fill export, written on its own by the process that owns it.

:func:`svdfill.fill.dataset.export_dataset` walks every block on every rank (a torchrun
collective per block). A Ray actor that writes its own part instead computes only its
part's blocks, asking the other actors for their item shards' lists as it goes; this
module is that writer: the same part file (name, block range, schema and metadata, resume
parameters) as :func:`export_dataset` writes for rank ``part`` of ``parts``, so the folder,
its manifest and ``pyarrow.dataset`` read-back are identical whichever way it was made, and
a killed writer resumes at its part's first unfinished block.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class PartLayout:
    """Part ``part`` of ``parts`` of a fill: ``name`` (``part-NNNNN.parquet``), user blocks
    ``[lo, hi)``, its Parquet ``schema`` (the plan's metadata + ``svdfill.part/parts/blocks``)
    and the resume ``params``."""

    part: int
    parts: int
    name: str
    lo: int
    hi: int
    schema: Any
    params: dict


def part_layout(plan, part: int, parts: int) -> PartLayout:
    """The layout :func:`svdfill.fill.dataset.export_dataset` gives rank ``part``."""
    from svdfill.fill.dataset import part_blocks, part_name

    lo, hi = part_blocks(part, parts, plan.n_blocks)
    meta = dict(plan.meta, **{"svdfill.part": str(part), "svdfill.parts": str(parts),
                              "svdfill.blocks": f"{lo}:{hi}"})
    return PartLayout(part, parts, part_name(part), lo, hi, plan.schema.with_metadata(meta),
                      dict(plan.params, **meta))


def write_part(plan, out: str | os.PathLike, part: int, parts: int,
               table_of: Callable[[int], Any], *, ahead: Callable[[int], None] | None = None) -> dict:
    """Write part ``part`` of the dataset folder ``out`` (which exists): blocks from the
    first unfinished one, ``table_of(b)`` giving block ``b``'s pyarrow table (global block
    index, called in increasing order); ``ahead(b)`` is told the next block before block
    ``b``'s table is asked for (so its lists can be requested early). A part already finished
    by an earlier run of the same export is kept. Returns the manifest entry (file,
    first_block, last_block, rank, rows, bytes, sha256) plus ``resumed_blocks`` and
    ``seconds``."""
    import pyarrow.parquet as pq

    from svdfill.data.export import ResumableParquetWriter
    from svdfill.fill.dataset import _finished_part, _sha256
    from svdfill.fill.export import BlockSink, _test_kill_hook, write_failed

    t0 = time.perf_counter()
    out = Path(out)
    lay = part_layout(plan, part, parts)
    path = out / lay.name
    done = lay.hi - lay.lo
    if not (_finished_part(path, lay.schema) and not (out / f".{lay.name}.partial").exists()):
        writer = ResumableParquetWriter(path, lay.schema, lay.params, lay.hi - lay.lo)
        done = writer.first_block
        sink = BlockSink(writer, on_written=lambda j: _test_kill_hook(lay.lo + j, part))
        try:
            writer.open()
            for b in range(lay.lo + done, lay.hi):
                if ahead is not None and b + 1 < lay.hi:
                    ahead(b + 1)
                sink.put(b - lay.lo, table_of(b))
            sink.drain()
            writer.finish()
        except BaseException as e:
            sink.cancel()
            writer.abort()
            if isinstance(e, OSError):
                raise write_failed(writer, path, e, lay.hi - lay.lo) from e
            raise
        finally:
            sink.close()
    return {"file": lay.name, "first_block": lay.lo, "last_block": lay.hi - 1, "rank": part,
            "rows": pq.ParquetFile(path).metadata.num_rows, "bytes": path.stat().st_size,
            "sha256": _sha256(path), "resumed_blocks": done, "seconds": time.perf_counter() - t0}
