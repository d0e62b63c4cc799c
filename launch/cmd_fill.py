"""`svdfill fill`: every unseen (user, item) pair scored, each user's top-k exported as Parquet.

Reads ``runs/NAME/model.pt`` (and ``seen.pt`` for ``--exclude-seen``, the default), runs
:func:`svdfill.kernels.fill.fill_topk` block by block and streams one Parquet row group per
user block through :class:`svdfill.data.export.ResumableParquetWriter`: the file appears
atomically, and a killed export resumes at the first unfinished block when the same
command is run again. ``--full`` writes the dense fill of every unseen pair instead.

Settings left out on the command line come from the run's ``[fill]`` config section.

``--launcher torchrun --nproc N`` reruns the same command as a one-machine torchrun job
(``python -m torch.distributed.run --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_fill …``): N item shards, the same Parquet file. Top-k only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RANK_MAX = 32767  # the rank column is int16
TORCHRUN_MODULE = "svdfill.launch.torchrun_fill"


def add_arguments(parser: argparse.ArgumentParser, *, launcher: bool = True) -> None:
    """The options of ``svdfill fill``; ``launcher=False`` leaves out ``--launcher`` and
    ``--nproc`` (for entry points that already are one rank of a distributed job)."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory of a trained model (runs/NAME) or its model.pt")
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="output Parquet file")
    parser.add_argument("--k", type=int, default=None,
                        help="items per user (default: the run's fill.k); clamped to the number of items")
    parser.add_argument("--users", metavar="FILE", default=None,
                        help="only these users: a text file with one raw user id per line "
                             "('#' comments and blank lines skipped); output in file order")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: the run's fill.device, cuda if it is cpu "
                             "and a GPU is present)")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                        help="drop items the user already rated (default: the run's fill.exclude_seen)")
    parser.add_argument("--full", action="store_true",
                        help="dense fill: every unseen (user, item) pair with its score, no top-k")
    parser.add_argument("--dtype", choices=["float32", "tf32", "bfloat16"], default=None,
                        help="compute dtype of the score GEMM (default: the run's fill.dtype)")
    parser.add_argument("--memory-budget-mb", type=int, default=None,
                        help="memory for score tiles in MiB (default: from free device memory)")
    parser.add_argument("--user-block", type=int, default=None,
                        help="users per Parquet row group (default: automatic)")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished export of the same file made with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    if launcher:
        from svdfill.launch.launcher import add_launcher_arguments

        add_launcher_arguments(parser, TORCHRUN_MODULE)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def warn(msg: str) -> None:
    print(f"svdfill: warning: {msg}", file=sys.stderr)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_user_list(path: str | os.PathLike, idmap: Any):
    """Contiguous ids (int64 numpy [n], file order, first occurrence kept) of the raw user
    ids listed in ``path``, one per line. Raises UserError for unreadable files, ids of the
    wrong type, unknown ids (listing a few) and empty lists."""
    import numpy as np

    from svdfill.launch.errors import UserError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the user list: {e}") from None
    raw, lines = [], []
    want_int = idmap.user_dtype == "int64"
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if want_int:
            try:
                s = int(s)
            except ValueError:
                raise UserError(f"{p}:{n}: not an integer user id: {line.strip()[:60]!r} "
                                f"(the model's user ids are integers)") from None
        raw.append(s)
        lines.append(n)
    if not raw:
        raise UserError(f"{p}: no user ids in the file")
    arr = np.asarray(raw, dtype=np.int64) if want_int else np.asarray(raw, dtype=object)
    idx = idmap.encode_users(arr)
    unknown = np.nonzero(idx < 0)[0]
    if unknown.size:
        shown = ", ".join(f"{raw[j]!r} (line {lines[j]})" for j in unknown[:5])
        more = f" and {unknown.size - 5} more" if unknown.size > 5 else ""
        raise UserError(f"{p}: {unknown.size} user id(s) not in the model: {shown}{more}")
    _, first = np.unique(idx, return_index=True)
    if first.size < idx.size:
        warn(f"{p}: {idx.size - first.size} duplicate user id(s) ignored (first occurrence kept)")
        idx = idx[np.sort(first)]
    return idx.astype(np.int64)


def resolve_device(name: str | None):
    import torch

    from svdfill.launch.errors import UserError

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return dev


def default_user_block(n_items: int, k: int, full: bool, budget: int) -> int:
    """Users per row group: ~1M rows per top-k group; dense blocks bounded by the budget."""
    if full:
        return max(1, min(4_000_000 // max(n_items, 1), budget // (32 * max(n_items, 1))))
    return max(64, 1_000_000 // k)


# ------------------------------------------------------------------------------------------
# the export job (also used by `svdfill bench fill` and `svdfill run`)
# ------------------------------------------------------------------------------------------

def export_fill(state: dict, idmap: Any, out: str | os.PathLike, *, k: int, seen=None, users=None,
                full: bool = False, device=None, dtype: str | None = None,
                memory_budget: int | None = None, user_block: int | None = None,
                restart: bool = False, quiet: bool = False, provenance: dict | None = None,
                topk_factory=None) -> dict:
    """Fill and export to Parquet; returns a summary dict (rows, users, blocks, seconds, path).

    state: the five model tensors (CPU); idmap: the model's IdMap; seen: CSR (indptr,
    indices) of items to exclude per user, or None; users: contiguous user ids (int64 numpy)
    or None for all users in id order; k: items per user (1..min(I, 32767), ignored with
    ``full``); provenance: extra file metadata (model hash, …) that also keys the resume.
    topk_factory: (distributed fill, svdfill.distributed) ``topk_factory(rows_of, n_blocks)``
    returning ``fn(b) -> (scores [B, k], items [B, k])``, the top-k of block ``b`` whose
    users are ``rows_of(b)`` (int64 [B]); used instead of the local ``fill_topk`` (top-k only).
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    import svdfill
    from svdfill.data.export import (ExportError, ResumableParquetWriter, RawIds, check_disk_space,
                                     full_schema, full_table, ipc_bytes, parquet_bytes, topk_schema,
                                     topk_table)
    from svdfill.kernels.fill import DEFAULT_CPU_BUDGET, csr_slice, csr_take, fill_topk, score_dense
    from svdfill.launch.errors import os_error_message

    t0 = time.perf_counter()
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

    sharded = None if (full or topk_factory is None) else topk_factory(lambda b: block_users(b)[0], n_blocks)

    def compute(b: int):
        if sharded is not None:  # item shards on other processes (svdfill.distributed)
            rows = block_users(b)[0]
            sc, it = sharded(b)
            return topk_table(rows.numpy(), it.cpu().numpy(), sc.cpu().numpy(), user_ids, item_ids, schema)
        rows, pb, bub, sub = block_users(b)
        if not full:
            sc, it = fill_topk(pb, Q, bub, bi, mu, k, sub, dtype=dtype, memory_budget=budget)
            return topk_table(rows.numpy(), it.cpu().numpy(), sc.cpu().numpy(), user_ids, item_ids, schema)
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

    writer = ResumableParquetWriter(out, schema, params, n_blocks, restart=restart)
    first = writer.first_block
    pool = ThreadPoolExecutor(1, thread_name_prefix="svdfill-export")
    pending = None

    def write(b: int, table) -> None:
        writer.write_block(b, table)
        _test_kill_hook(b)
    bar = tqdm(total=n_blocks, initial=0, unit="block", desc="fill", disable=quiet or not sys.stderr.isatty(),
               dynamic_ncols=True)
    rows_written = 0
    try:
        if full:
            # size check before any work: measure the first block's bytes, extrapolate
            sample = compute(0)
            per_row = (parquet_bytes(sample) + ipc_bytes(sample)) / max(sample.num_rows, 1)
            n_seen = 0 if seen is None else (int(s_ptr[-1]) if sel is None
                                             else int((s_ptr[sel + 1] - s_ptr[sel]).sum()))
            total_rows = n_sel * n_items - n_seen
            check_disk_space(Path(out).resolve().parent, int(per_row * total_rows * 1.1) + (64 << 20),
                             f"the dense fill of {total_rows:,} pairs (Parquet + resume parts)")
        writer.open(on_replayed=lambda b: bar.update(1))
        if first:
            bar.set_postfix_str(f"resumed at block {first}")
        # block b is written on a thread while block b + 1 is computed (one block in
        # flight: memory stays at two blocks; blocks still reach the writer in order)
        for b in range(first, n_blocks):
            table = sample if (full and b == 0) else compute(b)
            if pending is not None:
                pending.result()
                bar.update(1)
            pending = pool.submit(write, b, table)
            rows_written += table.num_rows
        if pending is not None:
            pending.result()
            bar.update(1)
        path = writer.finish()
    except BaseException as e:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                pending.result()  # never two writes at once: let the one running end first
        writer.abort()
        if isinstance(e, OSError):  # disk full, folder removed…: say what survives
            done = writer.finished_blocks()
            kept = (f"{done} of {n_blocks} blocks are finished and kept in {writer.partial}; rerun "
                    f"the same command to resume" if writer.partial.is_dir() else "nothing was written")
            raise ExportError(f"{out}: writing the export failed ({os_error_message(e)}); {kept}") from e
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return {"path": str(path), "blocks": n_blocks, "resumed_at": first, "users": n_sel,
            "rows_computed": rows_written, "seconds": time.perf_counter() - t0, "user_block": block}


def _test_kill_hook(b: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process after block N is written
    when ``SVDFILL_TEST_KILL_AFTER_BLOCK=N`` (a real kill -9, nothing is cleaned up)."""
    at = os.environ.get("SVDFILL_TEST_KILL_AFTER_BLOCK")
    if at is not None and int(at) == b:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------

def main(args: argparse.Namespace, *, sharded=None) -> int:
    """``sharded`` (svdfill.distributed): ``sharded(state, seen, k, device, dtype, memory_budget)
    -> topk_factory`` for :func:`export_fill`, to compute the top-k over item shards elsewhere
    (Ray actors, torchrun ranks) while this process writes the same file."""
    from svdfill.launch.launcher import launch_torchrun, launcher_nproc
    from svdfill.launch.errors import UserError

    if args.k is not None and args.k <= 0:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.memory_budget_mb is not None and args.memory_budget_mb <= 0:
        raise UserError(f"--memory-budget-mb must be positive, got {args.memory_budget_mb}")
    if args.user_block is not None and args.user_block <= 0:
        raise UserError(f"--user-block must be positive, got {args.user_block}")
    nproc = launcher_nproc(args)  # None where the parser has no --launcher (torchrun, Ray)
    if nproc is not None:
        if args.full:
            raise UserError("--full is written by one process: run `svdfill fill --full` "
                            "without --launcher torchrun")
        return launch_torchrun(TORCHRUN_MODULE, args, add_arguments, nproc)
    from svdfill.checkpoint import SEEN_FILE, load_model, load_seen
    from svdfill.data.export import check_writable
    from svdfill.kernels.fill import device_dtype

    out = Path(args.out)
    check_writable(out)
    model = load_model(args.model)
    fcfg = model.config.fill
    run_dir = model.path.parent
    n_items = model.n_items
    k = fcfg.k if args.k is None else args.k
    if not args.full:
        if k > n_items:
            warn(f"--k {k} is more than the model's {n_items} items: using k = {n_items}")
            k = n_items
        if k > RANK_MAX:
            raise UserError(f"--k {k}: ranks are int16, so k is at most {RANK_MAX} (use --full for every pair)")
    exclude = fcfg.exclude_seen if args.exclude_seen is None else args.exclude_seen
    seen = None
    provenance = {"model_sha256": file_sha256(model.path)}
    if exclude:
        if not (run_dir / SEEN_FILE).exists():
            raise UserError(f"{run_dir / SEEN_FILE}: missing, so seen items cannot be excluded "
                            f"(rerun with --no-exclude-seen to keep them)")
        seen = load_seen(run_dir)["all"]
        if seen[0].numel() != model.n_users + 1 or (seen[1].numel() and int(seen[1].max()) >= n_items):
            raise UserError(f"{run_dir / SEEN_FILE}: seen sets do not match the model "
                            f"({model.n_users} users × {n_items} items)")
        provenance["seen_sha256"] = file_sha256(run_dir / SEEN_FILE)
    users = read_user_list(args.users, model.idmap) if args.users else None
    device = resolve_device(args.device if args.device is not None else
                            (None if fcfg.device == "cpu" else fcfg.device))
    dtype = args.dtype or fcfg.dtype
    local = sharded is None or getattr(sharded, "computes_here", True)  # Ray actors choose
    if args.dtype is None and local and device_dtype(dtype, device) != dtype:
        if not args.quiet:
            print(f"svdfill: fill.dtype = {dtype} is a GPU setting; computing in float32 on "
                  f"{device} (--dtype {dtype} forces it)")
        dtype = device_dtype(dtype, device)
    budget_mb = args.memory_budget_mb if args.memory_budget_mb is not None else fcfg.memory_budget_mb
    block = args.user_block if args.user_block is not None else (fcfg.user_block or None)
    budget = budget_mb * 2**20 if budget_mb else None
    if sharded is not None and args.full:
        raise UserError("--full is written by one process: run `svdfill fill --full` instead")
    factory = None if sharded is None else sharded(model.state, seen, k, device, dtype, budget)
    summary = export_fill(model.state, model.idmap, out, k=k, seen=seen, users=users, full=args.full,
                          device=device, dtype=dtype, memory_budget=budget,
                          user_block=block, restart=args.restart, quiet=args.quiet, provenance=provenance,
                          topk_factory=factory)
    if not args.quiet:
        what = "every unseen pair" if args.full else f"top-{k}"
        resumed = f", resumed at block {summary['resumed_at']}" if summary["resumed_at"] else ""
        from svdfill.kernels.fill import kernel_choices

        kernels = sorted({c["kernel"] for c in kernel_choices().values()})
        how = f" ({'/'.join(kernels)} fill kernel)" if kernels and not args.full else ""
        print(f"svdfill: wrote {what} of {summary['users']:,} users to {summary['path']} "
              f"({summary['blocks']} row groups{resumed}) in {summary['seconds']:.1f} s on {device}{how}")
    return 0
