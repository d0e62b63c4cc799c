"""`svdfill similar`: each item's top-k most similar items (itself excluded) as Parquet.

Reads ``runs/NAME/model.pt`` and hands the job to
:func:`svdfill.fill.similar.export_similar`: cosine of the item factors (``--metric
cosine``, the default) or their dot product, computed by the fill engine, written as
``item_id, neighbor_id, score, rank`` with the model's raw ids. Like ``svdfill fill`` the
file appears atomically and a killed run resumes when the same command is run again.

At scale: ``--launcher torchrun --nproc N`` reruns the command as a one-machine torchrun job
(:mod:`svdfill.launch.torchrun_similar`) and ``python -m svdfill.launch.ray_job similar`` on
W Ray actors: each process holds one item shard of the neighbour table, rank 0 (the driver)
merges the shards' lists block by block and writes the same file, bit for bit.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

TORCHRUN_MODULE = "svdfill.launch.torchrun_similar"


def add_arguments(parser: argparse.ArgumentParser, *, launcher: bool = True) -> None:
    """The options of ``svdfill similar``; ``launcher=False`` leaves out ``--launcher`` and
    ``--nproc`` (entry points that already are one rank of a distributed job)."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory of a trained model (runs/NAME) or its model.pt")
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="output Parquet file")
    parser.add_argument("--k", type=int, default=20,
                        help="neighbours per item (default 20); clamped to the number of items − 1")
    parser.add_argument("--metric", choices=["cosine", "dot"], default="cosine",
                        help="cosine of the item factors (default) or their dot product")
    parser.add_argument("--items", metavar="FILE", default=None,
                        help="only these items' lists: a text file with one raw item id per line "
                             "('#' comments and blank lines skipped); output in file order")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: cuda if a GPU is present)")
    parser.add_argument("--dtype", choices=["float32", "tf32", "bfloat16"], default="float32",
                        help="compute dtype of the score GEMM (default float32)")
    parser.add_argument("--memory-budget-mb", type=int, default=None,
                        help="memory for score tiles in MiB (default: from free device memory)")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished export of the same file made with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    if launcher:
        from svdfill.launch.launcher import add_launcher_arguments

        add_launcher_arguments(parser, TORCHRUN_MODULE)


def read_item_list(path: str | os.PathLike, idmap: Any):
    """:func:`svdfill.launch.cmd_fill.read_id_list` of items (``--items``)."""
    from svdfill.launch.cmd_fill import read_id_list

    return read_id_list(path, idmap, "item")


def main(args: argparse.Namespace, *, sharded=None) -> int:
    """``svdfill similar``. ``sharded``: a not yet started
    :class:`svdfill.distributed.sharded_fill.ShardedFill` (torchrun ranks, Ray actors) that
    computes each block's lists from item shards held by other processes."""
    from svdfill.checkpoint import load_model
    from svdfill.data.export import check_writable
    from svdfill.errors import UserError
    from svdfill.fill.export import RANK_MAX
    from svdfill.fill.similar import export_similar
    from svdfill.launch.cmd_fill import file_sha256, resolve_device, warn

    if args.k <= 0:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.memory_budget_mb is not None and args.memory_budget_mb <= 0:
        raise UserError(f"--memory-budget-mb must be positive, got {args.memory_budget_mb}")
    from svdfill.launch.launcher import launch_torchrun, launcher_nproc

    nproc = launcher_nproc(args)  # None where the parser has no --launcher (torchrun, Ray)
    if nproc is not None:
        return launch_torchrun(TORCHRUN_MODULE, args, add_arguments, nproc)
    out = Path(args.out)
    check_writable(out)
    model = load_model(args.model)
    n_items = model.n_items
    if n_items < 2:
        raise UserError(f"{model.path}: the model has {n_items} item(s): no neighbours to list")
    k = args.k
    if k > n_items - 1:
        warn(f"--k {k} is more than the model's {n_items} items less the item itself: "
             f"using k = {n_items - 1}")
        k = n_items - 1
    if k > RANK_MAX:
        raise UserError(f"--k {k}: ranks are int16, so k is at most {RANK_MAX}")
    items = read_item_list(args.items, model.idmap) if args.items else None
    device = resolve_device(args.device)
    budget = args.memory_budget_mb * 2**20 if args.memory_budget_mb else None
    summary = export_similar(model.state, model.idmap, out, k=k, metric=args.metric, items=items,
                             device=device, dtype=args.dtype, memory_budget=budget,
                             restart=args.restart, quiet=args.quiet,
                             provenance={"model_sha256": file_sha256(model.path)},
                             sharded=sharded)
    if not args.quiet:
        resumed = f", resumed at block {summary['resumed_at']}" if summary["resumed_at"] else ""
        print(f"svdfill: wrote the top-{k} {args.metric} neighbours of {summary['items']:,} items "
              f"to {summary['path']} ({summary['blocks']} row groups{resumed}) in "
              f"{summary['seconds']:.1f} s on {device}"
              + (f" with {sharded_size(sharded)} item shards" if sharded is not None else ""))
    return 0


def sharded_size(sharded) -> int:
    """Item shards of a sharded fill (torchrun ranks or Ray actors)."""
    world = getattr(sharded, "world", None)
    return world.world_size if world is not None else getattr(sharded, "num_actors", 1)
