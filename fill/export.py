"""The fill export: every user's top-k (or, with ``full``, every unseen pair) streamed to Parquet.

:func:`export_fill` is the whole job behind ``svdfill fill``, ``svdfill run`` and
``svdfill bench fill``: it walks the users in blocks (one Parquet row group each), computes
a block with :func:`svdfill.kernels.fill.fill_topk` (or :func:`score_dense` for ``full``)
while the previous block is written on a thread, and writes through
:class:`svdfill.data.export.ResumableParquetWriter` — the file appears atomically, and a
killed export resumes at the first unfinished block. ``full`` measures its first block and
refuses to start without the disk space for the whole file.

A top-k fill can be computed elsewhere: ``sharded`` (a :class:`ShardedTopk`, implemented by
:mod:`svdfill.distributed.sharded_fill` over torchrun ranks or Ray actors) is handed the
block → users mapping and answers each block's merged top-k; this process still writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

Tensor = torch.Tensor

RANK_MAX = 32767  # the rank column is int16
KILL_ENV = "SVDFILL_TEST_KILL_AFTER_BLOCK"


class BlockTopk(Protocol):
    """``fn(b) -> (scores float32 [B, k], items int64 [B, k])``: the merged top-k of user
    block ``b`` (global item ids; −1 / −inf padding). Called with increasing ``b``."""

    def __call__(self, b: int) -> tuple[Tensor, Tensor]: ...


class ShardedTopk(Protocol):
    """A top-k computed over item shards outside this process (torchrun ranks, Ray actors).

    ``blocks(rows_of, n_blocks)``: called once by :func:`export_fill` with ``rows_of(b)``,
    the users (int64 [B]) of block ``b``, and the number of blocks; returns the block top-k
    function the export calls in block order (from its first unfinished block on).
    """

    def blocks(self, rows_of: Callable[[int], Tensor], n_blocks: int) -> BlockTopk: ...


def default_user_block(n_items: int, k: int, full: bool, budget: int) -> int:
    """Users per row group: ~1M rows per top-k group; dense blocks bounded by the budget."""
    if full:
        return max(1, min(4_000_000 // max(n_items, 1), budget // (32 * max(n_items, 1))))
    return max(64, 1_000_000 // k)


class FillPlan:
    """Everything an export of one model needs before it writes: the block layout, the
    Parquet schema (with the file metadata), the resume parameters and the block → table
    functions. Built by :func:`plan_fill`; shared by :func:`export_fill` (one file) and
    :func:`svdfill.fill.dataset.export_dataset` (a folder of parts).

    Attributes: ``schema`` (pyarrow, metadata = ``meta``), ``meta`` (str → str),
    ``params`` (meta + device + budget: what keys a resume), ``block`` (users per block),
    ``n_blocks``, ``n_sel`` (users filled), ``n_items``, ``k``, ``full``, ``budget``.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def rows_of(self, b: int) -> Tensor:
        """The users of block ``b``: contiguous ids int64 [B] (CPU)."""
        return self.block_users(b)[0]

    def table(self, rows: Tensor, scores: Tensor, items: Tensor):
        """One block's Parquet rows from its merged top-k: ``rows`` int64 [B], ``scores``
        float32 [B, k], ``items`` int64 [B, k] (global ids, −1 padding), any device."""
        from svdfill.data.export import topk_table

        return topk_table(rows.numpy(), items.cpu().numpy(), scores.cpu().numpy(), self.user_ids,
                          self.item_ids, self.schema)


def plan_fill(state: dict, idmap: Any, *, k: int, seen=None, users=None, full: bool = False,
              device=None, dtype: str | None = None, memory_budget: int | None = None,
              user_block: int | None = None, provenance: dict | None = None) -> FillPlan:
    """The :class:`FillPlan` of a fill (arguments as for :func:`export_fill`)."""
    import numpy as np

    import svdfill
    from svdfill.data.export import RawIds, full_schema, full_table, topk_schema
    from svdfill.kernels.fill import DEFAULT_CPU_BUDGET, csr_slice, csr_take, fill_topk, score_dense

    device = torch.device(device or "cpu")
    P = state["user_factors"].to(device, torch.float32)
    Q = state["item_factors"].to(device, torch.float32)
    bu = state["user_bias"].to(device, torch.float32)
    bi = state["item_bias"].to(device, torch.float32)
    mu = float(state["global_mean"])
    n_users, n_items = P.shape[0], Q.shape[0]
    sel = None if users is None else torch.as_tensor(np.asarray(users, dtype=np.int64))
    n_sel = n_users if sel is None else int(sel.numel())
    if not full and not 1 <= k <= min(n_items, RANK_MAX):
        raise ValueError(f"k={k} outside 1..{min(n_items, RANK_MAX)}")
    budget = memory_budget or (DEFAULT_CPU_BUDGET if device.type == "cpu" else None)
    dense_budget = budget or int(torch.cuda.mem_get_info(device)[0] * 0.5)
    block = user_block or default_user_block(n_items, k, full, dense_budget)
    n_blocks = max(1, -(-n_sel // block))
    s_ptr = s_idx = None
    if seen is not None:
        s_ptr, s_idx = seen[0].to(torch.int64), seen[1]

    meta = {
        "svdfill.version": svdfill.__version__,
        "svdfill.mode": "full" if full else "topk",
        "svdfill.k": str(0 if full else k),
        "svdfill.exclude_seen": "true" if seen is not None else "false",
        "svdfill.user_block": str(block),
        "svdfill.dtype": dtype or "float32",
        "svdfill.n_users": str(n_sel),
        "svdfill.n_items": str(n_items),
    }
    meta.update({f"svdfill.{key}": str(v) for key, v in (provenance or {}).items()})
    if sel is not None:
        meta["svdfill.users_sha256"] = hashlib.sha256(sel.numpy().tobytes()).hexdigest()
    schema = (full_schema if full else topk_schema)(idmap, meta)
    params = dict(meta, device=device.type, memory_budget=budget or 0)
    user_ids, item_ids = RawIds(idmap.user_ids), RawIds(idmap.item_ids)

    def block_users(b: int):
        lo, hi = b * block, min((b + 1) * block, n_sel)
        if sel is None:
            rows = torch.arange(lo, hi)
            sub = None if seen is None else csr_slice(s_ptr, s_idx, lo, hi)
            return rows, P[lo:hi], bu[lo:hi], sub
        rows = sel[lo:hi]
        sub = None if seen is None else csr_take(s_ptr, s_idx, rows)
        r = rows.to(device)
        return rows, P.index_select(0, r), bu.index_select(0, r), sub

    def compute(b: int):
        """Block ``b``'s table computed in this process (top-k or dense)."""
        rows, pb, bub, sub = block_users(b)
        if not full:
            sc, it = fill_topk(pb, Q, bub, bi, mu, k, sub, dtype=dtype, memory_budget=budget)
            return plan.table(rows, sc, it)
        scores = score_dense(pb, Q, bub, bi, mu, dtype=dtype)
        keep = torch.ones(scores.shape, dtype=torch.bool, device=device)
        if sub is not None and sub[1].numel():
            counts = (sub[0][1:] - sub[0][:-1]).to(device)
            r = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
            keep.view(-1)[r * n_items + sub[1].to(device, torch.int64)] = False
        flat = keep.view(-1).nonzero().flatten()
        sc = scores.view(-1)[flat].cpu().numpy()
        flat = flat.cpu().numpy()
        return full_table(rows.numpy(), flat // n_items, flat % n_items, sc, user_ids, item_ids, schema)

    def dense_rows() -> int:
        """Unseen pairs of the selected users: the rows of a dense fill."""
        n_seen = 0 if seen is None else (int(s_ptr[-1]) if sel is None
                                         else int((s_ptr[sel + 1] - s_ptr[sel]).sum()))
        return n_sel * n_items - n_seen

    plan = FillPlan(schema=schema, meta=meta, params=params, block=block, n_blocks=n_blocks,
                    n_sel=n_sel, n_items=n_items, k=k, full=full, budget=budget, device=device,
                    user_ids=user_ids, item_ids=item_ids, block_users=block_users, compute=compute,
                    dense_rows=dense_rows)
    return plan


def check_dense_space(plan: FillPlan, sample, folder: Path) -> None:
    """Refuse a dense fill without the disk space for it: ``sample`` (block 0's table)
    measured, extrapolated to every unseen pair (Parquet + the resume parts)."""
    from svdfill.data.export import check_disk_space, ipc_bytes, parquet_bytes

    per_row = (parquet_bytes(sample) + ipc_bytes(sample)) / max(sample.num_rows, 1)
    total_rows = plan.dense_rows()
    check_disk_space(folder, int(per_row * total_rows * 1.1) + (64 << 20),
                     f"the dense fill of {total_rows:,} pairs (Parquet + resume parts)")


class BlockSink:
    """Feeds tables to a :class:`~svdfill.data.export.ResumableParquetWriter` with one write
    in flight on a thread, so block ``b`` is written while ``b + 1`` is computed (memory
    stays at two blocks; blocks still reach the writer in order).

    ``put(b, table)`` takes the writer's block index ``b``; ``on_written(b)`` runs on the
    thread after each write (the kill hook, …); ``drain()`` waits for the last one.
    ``close()`` always (it cancels or waits for a write left in flight).
    """

    def __init__(self, writer, on_written: Callable[[int], None] | None = None,
                 on_done: Callable[[], None] | None = None):
        self.writer, self.on_written, self.on_done = writer, on_written, on_done
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="svdfill-export")
        self.pending = None

    def _write(self, b: int, table) -> None:
        self.writer.write_block(b, table)
        if self.on_written is not None:
            self.on_written(b)

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None
            if self.on_done is not None:
                self.on_done()

    def put(self, b: int, table) -> None:
        self._wait()
        self.pending = self.pool.submit(self._write, b, table)

    def drain(self) -> None:
        self._wait()

    def cancel(self) -> None:
        """After a failure: never two writes at once, so let the running one end first."""
        if self.pending is not None:
            self.pending.cancel()
            with contextlib.suppress(BaseException):
                self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def write_failed(writer, out, e: OSError, n_blocks: int):
    """The :class:`ExportError` for an OSError mid-export (disk full, folder removed…),
    saying what survives for a rerun."""
    from svdfill.data.export import ExportError
    from svdfill.errors import os_error_message

    done = writer.finished_blocks()
    kept = (f"{done} of {n_blocks} blocks are finished and kept in {writer.partial}; rerun "
            f"the same command to resume" if writer.partial.is_dir() else "nothing was written")
    return ExportError(f"{out}: writing the export failed ({os_error_message(e)}); {kept}")


def export_fill(state: dict, idmap: Any, out: str | os.PathLike, *, k: int, seen=None, users=None,
                full: bool = False, device=None, dtype: str | None = None,
                memory_budget: int | None = None, user_block: int | None = None,
                restart: bool = False, quiet: bool = False, provenance: dict | None = None,
                sharded: ShardedTopk | None = None) -> dict:
    """Fill and export to Parquet; returns a summary dict (rows, users, blocks, seconds, path).

    state: the five model tensors (CPU); idmap: the model's IdMap; seen: CSR (indptr,
    indices) of items to exclude per user, or None; users: contiguous user ids (int64 numpy)
    or None for all users in id order; k: items per user (1..min(I, 32767), ignored with
    ``full``); provenance: extra file metadata (model hash, …) that also keys the resume.
    sharded: a :class:`ShardedTopk` computing the top-k of each block elsewhere, instead of
    the local ``fill_topk`` (top-k only; ignored with ``full``). The blocks, their order and
    the file are the same either way. A folder of parts instead of one file:
    :func:`svdfill.fill.dataset.export_dataset`.
    """
    from svdfill.data.export import ResumableParquetWriter

    t0 = time.perf_counter()
    plan = plan_fill(state, idmap, k=k, seen=seen, users=users, full=full, device=device, dtype=dtype,
                     memory_budget=memory_budget, user_block=user_block, provenance=provenance)
    n_blocks = plan.n_blocks
    remote = None if (full or sharded is None) else sharded.blocks(plan.rows_of, n_blocks)

    def compute(b: int):
        if remote is not None:  # item shards on other processes (svdfill.distributed)
            sc, it = remote(b)
            return plan.table(plan.rows_of(b), sc, it)
        return plan.compute(b)

    writer = ResumableParquetWriter(out, plan.schema, plan.params, n_blocks, restart=restart)
    first = writer.first_block
    sample: dict = {}

    def size_check() -> None:
        # --full: measure the first block's bytes and extrapolate, before any write
        sample[0] = compute(0)
        check_dense_space(plan, sample[0], Path(out).resolve().parent)

    path, rows_written = write_blocks(
        writer, lambda b: sample.pop(b) if b in sample else compute(b), n_blocks, out,
        desc="fill", quiet=quiet, before_open=size_check if full else None)
    return {"path": str(path), "blocks": n_blocks, "resumed_at": first, "users": plan.n_sel,
            "rows_computed": rows_written, "seconds": time.perf_counter() - t0, "user_block": plan.block}


def write_blocks(writer, compute, n_blocks: int, out, *, desc: str, quiet: bool,
                 before_open=None) -> tuple[Path, int]:
    """Blocks ``writer.first_block .. n_blocks - 1`` of ``compute(b) -> pyarrow.Table`` into
    the resumable ``writer`` (each written on a thread while the next is computed), with a
    progress bar; returns (the finished file, rows written). ``before_open()`` runs first
    (the dense fill's disk check). On failure nothing half-written is left in place and an
    OSError becomes an ExportError saying which blocks are kept."""
    from tqdm import tqdm

    first = writer.first_block
    bar = tqdm(total=n_blocks, initial=0, unit="block", desc=desc,
               disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    sink = BlockSink(writer, on_written=_test_kill_hook, on_done=lambda: bar.update(1))
    rows = 0
    try:
        if before_open is not None:
            before_open()
        writer.open(on_replayed=lambda b: bar.update(1))
        if first:
            bar.set_postfix_str(f"resumed at block {first}")
        for b in range(first, n_blocks):
            table = compute(b)
            sink.put(b, table)
            rows += table.num_rows
        sink.drain()
        path = writer.finish()
    except BaseException as e:
        sink.cancel()
        writer.abort()
        if isinstance(e, OSError):  # disk full, folder removed…: say what survives
            raise write_failed(writer, out, e, n_blocks) from e
        raise
    finally:
        sink.close()
        bar.close()
    return path, rows


def _test_kill_hook(b: int, rank: int = 0) -> None:
    """Fault injection for the resume tests: SIGKILL this process after block N is written
    when ``SVDFILL_TEST_KILL_AFTER_BLOCK=N`` (a real kill -9, nothing is cleaned up);
    ``N@R``: only on rank R (a partitioned export, where N is the global block index)."""
    at = os.environ.get(KILL_ENV)
    if at is None:
        return
    block, _, on_rank = at.partition("@")
    if int(block) == b and (not on_rank or int(on_rank) == rank):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
