"""The fill as a partitioned Parquet dataset: ``svdfill fill --out DIR/``, one part per writer.

Layout of ``DIR``::

    part-00000.parquet   blocks [lo_0, hi_0) of the fill, one row group per user block
    part-00001.parquet   blocks [lo_1, hi_1) …
    _manifest.json       written LAST (atomically): format, k, users, items, model hash,
                         and per part its file, block range, rows, bytes, sha256, writer rank

With W writers (torchrun ranks; one process is W = 1) user block ``b`` belongs to part
``b * W // n_blocks`` — contiguous ranges, so the parts in name order are the single file's
row groups in order, and ``pyarrow.dataset.dataset(DIR)`` (which skips ``_`` and ``.``
names) reads back the single-file output row for row. Each part has the single file's schema
and metadata keys plus ``svdfill.part``, ``svdfill.parts``, ``svdfill.blocks``.

With the item table replicated (``exchange.local``, the default for tables up to 512 MiB:
:func:`svdfill.distributed.sharding.fill_item_shards`) each writer computes only its own
blocks, over every item, and no collective runs per block. Otherwise every writer walks ALL
blocks in order: a block's top-k is computed over item shards by
every rank and merged on the block's owner (the ``exchange``, see
:class:`BlockExchange`; :class:`svdfill.distributed.sharded_fill.TorchrunExchange`), which
alone writes it. Each part is its own
:class:`~svdfill.data.export.ResumableParquetWriter` (its partial folder
``.part-NNNNN.parquet.partial/`` sits beside it), so a killed export resumes per part: the
writers all-gather how many of their blocks are finished and every rank skips the blocks
their owners already hold. The manifest exists only once every part is complete; a rerun
with other settings (k, model, number of writers → other block ranges) is refused, naming
``--restart``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from svdfill.fill.export import (BlockSink, FillPlan, ShardedTopk, _test_kill_hook, check_dense_space,
                                 plan_fill, write_failed)

Tensor = torch.Tensor

MANIFEST = "_manifest.json"
FORMAT = "svdfill-fill-dataset/1"
_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
_OURS_RE = re.compile(r"^(_manifest\.json(\.tmp)?|part-\d{5}\.parquet|\.part-\d{5}\.parquet\.partial)$")


def is_dataset_path(out: str | os.PathLike) -> bool:
    """``--out`` names a dataset folder: it ends with a path separator, or is a folder that
    is empty or holds an svdfill dataset. Any other folder is refused by the single-file
    export ("is a directory") as before: a trailing ``/`` says "a dataset here" on purpose."""
    s = os.fspath(out)
    if s.endswith(("/", os.sep)):
        return True
    p = Path(s)
    return p.is_dir() and all(_OURS_RE.match(x.name) for x in p.iterdir())


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def part_blocks(p: int, parts: int, n_blocks: int) -> tuple[int, int]:
    """Blocks ``[lo, hi)`` of part ``p``: those with ``b * parts // n_blocks == p``."""
    return -(-p * n_blocks // parts), -(-(p + 1) * n_blocks // parts)


def block_owner(b: int, parts: int, n_blocks: int) -> int:
    return b * parts // n_blocks


class BlockExchange(Protocol):
    """The ranks of a partitioned export (one process: none). ``rank``, ``size``: this
    writer and the number of writers (= parts).

    ``start(state, seen, *, k, device, dtype, memory_budget)``: hold this rank's item shard.
    ``all_gather(obj) -> [obj of rank 0, …]``: a collective over picklable objects.
    ``topk(rows, owner) -> (scores float32 [B, k], items int64 [B, k]) | None``: a
    collective every rank calls for every block in the same order: this rank's shard top-k
    of users ``rows`` (int64 [B]) sent to rank ``owner``, which gets the merged lists (the
    others get None). ``local`` (set by ``start``): every rank holds every item, so a rank
    computes only its own blocks and ``topk`` is asked of their owner alone, no collective.
    """

    rank: int
    size: int
    local: bool

    def start(self, state: dict, seen, *, k: int, device, dtype: str | None,
              memory_budget: int | None) -> None: ...

    def all_gather(self, obj: Any) -> list: ...

    def topk(self, rows: Tensor, owner: int) -> tuple[Tensor, Tensor] | None: ...


def _check_folder(out: Path, shown: str) -> None:
    """The folder can hold the dataset: its parent exists, and it holds nothing but an
    earlier svdfill dataset (pyarrow would read any other file as part of it)."""
    from svdfill.data.export import ExportError

    if out.exists() and not out.is_dir():
        raise ExportError(f"{shown}: is a file, not a folder (drop the trailing / to write one file)")
    if not out.parent.is_dir():
        raise ExportError(f"{shown}: folder {out.parent} does not exist")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OURS_RE.match(p.name))
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise ExportError(f"{shown}: holds files that are not part of an svdfill dataset "
                              f"({', '.join(foreign[:3])}{more}); give an empty or new folder")
    elif not os.access(out.parent, os.W_OK | os.X_OK):
        raise ExportError(f"{shown}: folder {out.parent} is not writable")


def _check_writers(out: Path, shown: str, parts: int) -> None:
    """An unfinished dataset of another number of writers cannot be resumed: its block
    ranges differ. Said once, for the whole folder, before any part is opened."""
    from svdfill.data.export import ExportError

    for params in sorted(out.glob(".part-*.parquet.partial/params.json")):
        try:
            theirs = json.loads(params.read_text())["params"]["svdfill.parts"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # the part's own writer reports it, naming the folder
        if str(theirs) != str(parts):
            raise ExportError(
                f"{shown}: an unfinished dataset written by {theirs} writer(s) is in the way; this run "
                f"has {parts}, and the block ranges of the parts depend on it: rerun with {theirs} "
                f"rank(s) to resume it, or add --restart to discard it")


def _clear(out: Path) -> None:
    """``--restart``: drop every part, partial folder and the manifest of ``out``."""
    for p in out.iterdir():
        if _OURS_RE.match(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _finished_part(path: Path, schema) -> bool:
    """A part finished by an earlier run of the same export (its svdfill metadata — model,
    k, blocks, … — is this part's), kept rather than computed again."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return False
    try:
        md = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply rewritten
        return False
    return ({k: v for k, v in md.items() if k.startswith(b"svdfill.")}
            == {k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"svdfill.")})


def _write_manifest(out: Path, plan: FillPlan, parts: list[dict]) -> Path:
    """``_manifest.json`` under a temporary name, fsynced, renamed: a reader sees it whole,
    and only after every part it lists."""
    from svdfill.data.durable import fsync_dir, fsync_file

    doc = {
        "format": FORMAT,
        "mode": plan.meta["svdfill.mode"],
        "k": int(plan.meta["svdfill.k"]),
        "n_users": plan.n_sel,
        "n_items": plan.n_items,
        "user_block": plan.block,
        "n_blocks": plan.n_blocks,
        "rows": sum(p["rows"] for p in parts),
        "model_sha256": plan.meta.get("svdfill.model_sha256"),
        "metadata": {k: v for k, v in plan.meta.items()},
        "parts": parts,
    }
    path, tmp = out / MANIFEST, out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(out)
    return path


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of a finished dataset folder (raises FileNotFoundError while unfinished)."""
    return json.loads((Path(out) / MANIFEST).read_text())


def export_dataset(state: dict, idmap: Any, out: str | os.PathLike, *, k: int, seen=None, users=None,
                   full: bool = False, device=None, dtype: str | None = None,
                   memory_budget: int | None = None, user_block: int | None = None,
                   restart: bool = False, quiet: bool = False, provenance: dict | None = None,
                   sharded: ShardedTopk | None = None, exchange: BlockExchange | None = None) -> dict:
    """Fill and export to the dataset folder ``out``; returns a summary dict (path, parts,
    blocks, resumed blocks, users, rows written here, seconds, user_block).

    Arguments as for :func:`svdfill.fill.export.export_fill`. ``exchange`` (a started
    :class:`BlockExchange`): this process is one of ``exchange.size`` writers, called on
    every rank with the same arguments (top-k only); without it this process writes the one
    part (its top-k computed here, or by ``sharded`` — Ray actors — as in ``export_fill``).
    """
    from tqdm import tqdm

    from svdfill.data.export import ExportError, ResumableParquetWriter

    t0 = time.perf_counter()
    shown = os.fspath(out)
    out = Path(out)
    rank, W = (exchange.rank, exchange.size) if exchange is not None else (0, 1)
    if exchange is not None and full:
        raise ValueError("a dense fill (full) is written by one process")
    plan = plan_fill(state, idmap, k=k, seen=seen, users=users, full=full, device=device, dtype=dtype,
                     memory_budget=memory_budget, user_block=user_block, provenance=provenance)
    n_blocks = plan.n_blocks
    lo, hi = part_blocks(rank, W, n_blocks)
    name = part_name(rank)
    part_meta = dict(plan.meta, **{"svdfill.part": str(rank), "svdfill.parts": str(W),
                                   "svdfill.blocks": f"{lo}:{hi}"})
    schema = plan.schema.with_metadata(part_meta)
    params = dict(plan.params, **part_meta)

    # Start: every check raises on every rank alike (an all-gathered verdict), so no rank
    # waits in a collective for one that gave up.
    writer, done, err = None, 0, None
    try:
        _check_folder(out, shown)
        if rank == 0:
            out.mkdir(exist_ok=True)
            if restart:
                _clear(out)
            else:
                _check_writers(out, shown, W)
            # the dataset is about to change: no reader may pair the old manifest with new parts
            (out / MANIFEST).unlink(missing_ok=True)
    except ExportError as e:
        err = str(e)
    if exchange is not None:
        errs = [x for x in exchange.all_gather(err) if x]
        err = errs[0] if errs else None
    if err is None:
        try:
            if _finished_part(out / name, schema) and not (out / f".{name}.partial").exists():
                done = hi - lo
            else:
                writer = ResumableParquetWriter(out / name, schema, params, hi - lo)
                done = writer.first_block
        except ExportError as e:
            err = str(e)
    state_all = exchange.all_gather((err, done)) if exchange is not None else [(err, done)]
    errs = [e for e, _ in state_all if e]
    if errs:
        raise ExportError(errs[0])
    done_all = [d for _, d in state_all]
    # the blocks still to compute, in order: each part's from its first unfinished one
    todo = [b for p in range(W) for b in range(part_blocks(p, W, n_blocks)[0] + done_all[p],
                                               part_blocks(p, W, n_blocks)[1])]
    if exchange is not None and exchange.local:
        todo = [b for b in todo if lo <= b < hi]  # replicated items: no other rank needs us

    remote = None if (full or sharded is None) else sharded.blocks(plan.rows_of, n_blocks)
    bar = tqdm(total=hi - lo, unit="block", desc=f"fill part {rank}", dynamic_ncols=True,
               disable=quiet or rank != 0 or not sys.stderr.isatty())
    rows_written = 0
    sink = None
    if writer is not None:
        sink = BlockSink(writer, on_written=lambda j: _test_kill_hook(lo + j, rank),
                         on_done=lambda: bar.update(1))
    try:
        sample = None
        if full and writer is not None and lo + done < hi:
            sample = plan.compute(lo + done)  # measured before any work, as export_fill does
            check_dense_space(plan, sample, out.resolve())
        if writer is not None:
            writer.open(on_replayed=lambda j: bar.update(1))
        for b in todo:
            if exchange is not None:
                merged = exchange.topk(plan.rows_of(b), block_owner(b, W, n_blocks))
                table = None if merged is None else plan.table(plan.rows_of(b), *merged)
            elif remote is not None:
                table = plan.table(plan.rows_of(b), *remote(b))
            else:
                table = sample if (sample is not None and b == lo + done) else plan.compute(b)
            if table is not None:
                sink.put(b - lo, table)
                rows_written += table.num_rows
        if writer is not None:
            sink.drain()
            writer.finish()
    except BaseException as e:
        if sink is not None:
            sink.cancel()
            writer.abort()
            if isinstance(e, OSError):
                raise write_failed(writer, out / name, e, hi - lo) from e
        raise
    finally:
        if sink is not None:
            sink.close()
        bar.close()

    import pyarrow.parquet as pq

    info = {"file": name, "first_block": lo, "last_block": hi - 1, "rank": rank,
            "rows": pq.ParquetFile(out / name).metadata.num_rows,
            "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
    infos = exchange.all_gather(info) if exchange is not None else [info]
    if rank == 0:
        for p in out.iterdir():  # parts of an earlier, larger dataset in this folder
            m = _PART_RE.match(p.name)
            if m and int(m.group(1)) >= W:
                p.unlink()
        _write_manifest(out, plan, infos)
    return {"path": shown, "parts": W, "blocks": n_blocks, "resumed_blocks": sum(done_all),
            "users": plan.n_sel, "rows_computed": rows_written, "seconds": time.perf_counter() - t0,
            "user_block": plan.block}


def grid_block_counts(user_bounds, block: int, users: Tensor | None = None) -> list[int]:
    """Blocks of each grid part: ``ceil(n_r / block)`` where ``n_r`` is the number of users
    of user block r (``u_hi − u_lo``), or with ``users`` (contiguous ids, int64) the number
    of them in it; 0 for a part with none."""
    return [-(-n // block) for n in grid_part_sizes(user_bounds, users)]


def grid_part_sizes(user_bounds, users: Tensor | None = None) -> list[int]:
    """Users each grid part writes: its whole user block, or those of ``users`` in it."""
    if users is None:
        return [int(hi) - int(lo) for lo, hi in user_bounds]
    return [int(((users >= int(lo)) & (users < int(hi))).sum()) for lo, hi in user_bounds]


def export_grid_dataset(tables: dict, idmap: Any, out: str | os.PathLike, *, layout, rank: int,
                        ring, all_gather, k: int, seen=None, users=None, device=None,
                        dtype: str | None = None, memory_budget: int | None = None,
                        user_block: int | None = None, restart: bool = False,
                        quiet: bool = False, provenance: dict | None = None) -> dict:
    """Rank ``rank``'s part of the grid fill dataset ``out`` (a collective of every rank of
    the ring; W = 1 is one process). Returns a summary dict like :func:`export_dataset`'s
    (+ ``ring_bytes_sent``: this rank's payload bytes on the ring).

    tables: this rank's blocks: ``user_factors [U_r, d]``, ``user_bias [U_r]`` (rows
    ``layout.user_bounds[rank]``), ``item_factors [I_r, d]``, ``item_bias [I_r]`` (rows
    ``layout.item_bounds[rank]``), ``global_mean``. layout: ``n_users``, ``n_items``,
    ``user_bounds``, ``item_bounds`` (a ``distributed.grid.GridLayout``). ring: a
    ``distributed.ring.Ring`` of the same ranks. all_gather: ``obj -> [obj of rank 0, …]``
    over the ranks. seen: CSR ``(indptr [U_r+1], indices)`` of GLOBAL item ids per local
    user row, or None. users: contiguous user ids (int64 numpy or tensor, no duplicates), the
    same on every rank (``--users``), or None for every user: each part then holds only
    the listed users of its user block, in list order (the parts in rank order: the
    one-process ``--users`` fill's rows, grouped by user block), and only they are scored
    (their rows of the user tables and seen CSR are taken before the ring runs); a part
    with none is an empty file, and its rank still takes part in the ring. The list's hash
    (``svdfill.users_sha256``, as in the one-process fill) keys the resume, so a rerun
    with another list is refused (``--restart``) rather than mixed into a killed run's
    parts. The other arguments as for :func:`export_dataset`.

    Resume: each part resumes at its first unfinished block; the ring then scores only the
    users of the unfinished blocks (every rank still takes part, with no users when its part
    is finished), and is skipped when every part is. Memory: the running top-k of the users
    still to write, ``12·k`` bytes per user.
    """
    import numpy as np
    from tqdm import tqdm

    import svdfill
    from svdfill.data.export import ExportError, RawIds, ResumableParquetWriter, topk_schema
    from svdfill.fill.export import RANK_MAX, default_user_block
    from svdfill.fill.grid_fill import grid_topk
    from svdfill.kernels.fill import DEFAULT_CPU_BUDGET
    from svdfill.kernels.topk import csr_slice, csr_take

    t0 = time.perf_counter()
    shown = os.fspath(out)
    out = Path(out)
    user_bounds = [(int(a), int(b)) for a, b in layout.user_bounds]
    item_bounds = [(int(a), int(b)) for a, b in layout.item_bounds]
    W = len(user_bounds)
    n_users, n_items = int(layout.n_users), int(layout.n_items)
    u_lo, u_hi = user_bounds[rank]
    if not 1 <= k <= min(n_items, RANK_MAX):
        raise ValueError(f"k={k} outside 1..{min(n_items, RANK_MAX)}")
    device = torch.device(device or "cpu")
    budget = memory_budget or (DEFAULT_CPU_BUDGET if device.type == "cpu" else None)
    block = user_block or default_user_block(n_items, k, False, budget or 0)
    sel = None if users is None else torch.as_tensor(np.asarray(users, dtype=np.int64))
    n_sel = n_users if sel is None else int(sel.numel())
    if sel is not None and n_sel and not (0 <= int(sel.min()) and int(sel.max()) < n_users):
        raise ValueError(f"users: contiguous ids outside 0..{n_users - 1}")
    # this part's users (contiguous ids, list order): its user block, or the listed ones in it
    mine = (torch.arange(u_lo, u_hi, dtype=torch.int64) if sel is None
            else sel[(sel >= u_lo) & (sel < u_hi)])
    n_mine = int(mine.numel())
    counts = grid_block_counts(user_bounds, block, sel)
    first = sum(counts[:rank])
    n_blocks = sum(counts)
    bounds_sha = hashlib.sha256(json.dumps([user_bounds, item_bounds]).encode()).hexdigest()
    meta = {
        "svdfill.version": svdfill.__version__, "svdfill.mode": "topk", "svdfill.k": str(k),
        "svdfill.exclude_seen": "true" if seen is not None else "false",
        "svdfill.user_block": str(block), "svdfill.dtype": dtype or "float32",
        "svdfill.n_users": str(n_sel), "svdfill.n_items": str(n_items),
        "svdfill.layout": "grid", "svdfill.grid_bounds_sha256": bounds_sha,
    }
    meta.update({f"svdfill.{key}": str(v) for key, v in (provenance or {}).items()})
    if sel is not None:  # the list's identity, as plan_fill records it: keys the resume
        meta["svdfill.users_sha256"] = hashlib.sha256(sel.numpy().tobytes()).hexdigest()
    name = part_name(rank)
    part_meta = dict(meta, **{"svdfill.part": str(rank), "svdfill.parts": str(W),
                              "svdfill.blocks": f"{first}:{first + counts[rank]}",
                              "svdfill.users": f"{u_lo}:{u_hi}"})
    schema = topk_schema(idmap, meta).with_metadata(part_meta)
    params = dict(part_meta, device=device.type, memory_budget=budget or 0)
    plan = FillPlan(schema=schema, meta=meta, block=block, n_blocks=n_blocks, n_sel=n_sel,
                    n_items=n_items, k=k, user_ids=RawIds(idmap.user_ids),
                    item_ids=RawIds(idmap.item_ids))

    # start: every check's verdict is all-gathered, so every rank raises alike
    writer, done, err = None, 0, None
    try:
        _check_folder(out, shown)
        if rank == 0:
            out.mkdir(exist_ok=True)
            if restart:
                _clear(out)
            else:
                _check_writers(out, shown, W)
            (out / MANIFEST).unlink(missing_ok=True)
    except ExportError as e:
        err = str(e)
    errs = [x for x in all_gather(err) if x]
    err = errs[0] if errs else None
    if err is None:
        try:
            if _finished_part(out / name, schema) and not (out / f".{name}.partial").exists():
                done = counts[rank]
            else:
                writer = ResumableParquetWriter(out / name, schema, params, counts[rank])
                done = writer.first_block
        except ExportError as e:
            err = str(e)
    state_all = all_gather((err, done))
    errs = [e for e, _ in state_all if e]
    if errs:
        raise ExportError(errs[0])
    done_all = [d for _, d in state_all]

    sent0 = ring.bytes_sent
    scores = items = None
    row0 = min(done * block, n_mine)  # position in ``mine`` of the first user still to write
    if any(d < c for d, c in zip(done_all, counts)):
        dev = device
        if sel is None:  # the whole block from row0: slices, no copy of the rows
            P = tables["user_factors"][row0:]
            bu = tables["user_bias"][row0:]
            sub = None if seen is None else csr_slice(seen[0].to(torch.int64), seen[1],
                                                      row0, u_hi - u_lo)
        else:  # only the listed users still to write: nobody else is scored
            local = mine[row0:] - u_lo
            P = tables["user_factors"].index_select(0, local.to(tables["user_factors"].device))
            bu = tables["user_bias"].index_select(0, local.to(tables["user_bias"].device))
            sub = None if seen is None else csr_take(seen[0].to(torch.int64), seen[1], local)
        P, bu = P.to(dev, torch.float32), bu.to(dev, torch.float32)
        scores, items = grid_topk(P, bu, tables["item_factors"].to(dev, torch.float32),
                                  tables["item_bias"].to(dev, torch.float32), item_bounds[rank][0],
                                  item_bounds, float(tables["global_mean"]), k, sub, ring,
                                  dtype=dtype, memory_budget=memory_budget)
    bar = tqdm(total=counts[rank], unit="block", desc=f"fill part {rank}", dynamic_ncols=True,
               disable=quiet or rank != 0 or not sys.stderr.isatty())
    rows_written = 0
    sink = None
    if writer is not None:
        sink = BlockSink(writer, on_written=lambda j: _test_kill_hook(first + j, rank),
                         on_done=lambda: bar.update(1))
    try:
        if writer is not None:
            writer.open(on_replayed=lambda j: bar.update(1))
            for b in range(done, counts[rank]):
                a, z = b * block, min((b + 1) * block, n_mine)
                table = plan.table(mine[a:z], scores[a - row0:z - row0], items[a - row0:z - row0])
                sink.put(b, table)
                rows_written += table.num_rows
            sink.drain()
            writer.finish()
    except BaseException as e:
        if sink is not None:
            sink.cancel()
            writer.abort()
            if isinstance(e, OSError):
                raise write_failed(writer, out / name, e, counts[rank]) from e
        raise
    finally:
        if sink is not None:
            sink.close()
        bar.close()

    import pyarrow.parquet as pq

    info = {"file": name, "first_block": first, "last_block": first + counts[rank] - 1,
            "rank": rank, "users": [u_lo, u_hi],
            "rows": pq.ParquetFile(out / name).metadata.num_rows,
            "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
    infos = all_gather(info)
    if rank == 0:
        for p in out.iterdir():  # parts of an earlier, larger dataset in this folder
            m = _PART_RE.match(p.name)
            if m and int(m.group(1)) >= W:
                p.unlink()
        _write_manifest(out, plan, infos)
    return {"path": shown, "parts": W, "blocks": n_blocks, "resumed_blocks": sum(done_all),
            "users": n_sel, "rows_computed": rows_written,
            "seconds": time.perf_counter() - t0, "user_block": block,
            "ring_bytes_sent": ring.bytes_sent - sent0}
