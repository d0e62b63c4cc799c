"""The fill under torchrun: ``torchrun --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_fill --model runs/NAME --k 100 --out recs.parquet``.

Same options and the same Parquet file as ``svdfill fill``. Rank r holds item shard r
(equal contiguous shards) on its device (``cuda:LOCAL_RANK`` when CUDA is there); rank 0
runs the export and, for each user block, sends the block's users to every rank, gathers
their shard top-k lists with ``torch.distributed`` and merges them
(:class:`svdfill.distributed.sharded_fill.TorchrunFill`; the other ranks run
:func:`~svdfill.distributed.sharded_fill.serve_torchrun`). Only rank 0 writes. ``--full`` is
a one-process job (``svdfill fill --full``).

``--out DIR/`` (a partitioned dataset): every rank runs the command itself and writes its
own part, the blocks' lists gathered to their owners
(:class:`~svdfill.distributed.sharded_fill.TorchrunExchange`,
:func:`svdfill.fill.dataset.export_dataset`); rank 0 prints the summary.

A grid run (``RUN/grid_model/``, trained with ``[dist] layout = "grid"``): every rank runs
:func:`svdfill.launch.fill_grid.main` — its user block's top-k as the item blocks pass
around a ring, written as its own part of ``--out DIR/``; nothing is gathered.
"""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from svdfill.launch import cmd_fill

    p = argparse.ArgumentParser(prog="python -m svdfill.launch.torchrun_fill",
                                description=__doc__.splitlines()[0])
    cmd_fill.add_arguments(p, launcher=False)
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")
    return p


def _load(args: argparse.Namespace):
    """``load(exclude_seen) -> (state, seen)`` of the model, for the ranks > 0: with the
    item filters of ``args`` applied as rank 0 applies them (compacted item table, exclusions
    merged), so every rank shards the same table. Rank 0 validated the files already."""
    def load(exclude: bool):
        from svdfill.checkpoint import load_model, load_seen
        from svdfill.launch import cmd_fill

        model = load_model(args.model)
        state, idmap = model.state, model.idmap
        fcfg = model.config.fill
        own = fcfg.exclude_seen if args.exclude_seen is None else args.exclude_seen
        if args.foldin:  # the same fold-in as rank 0's (deterministic): the same tables
            folded = cmd_fill.fold_in_for_fill(model, args.foldin, device=args.device, quiet=True)
            state, idmap = folded.state, folded.idmap
            seen = folded.seen["all"] if own else None
        else:
            seen = load_seen(model.path.parent)["all"] if own else None
        filters, _ = cmd_fill.read_filters(args, idmap)
        if not filters:
            return state, (seen if exclude else None)
        from svdfill.fill.filters import filter_fill_inputs

        # `exclude` also says "exclusions given": the run's own seen sets follow the option
        state, _, seen, _ = filter_fill_inputs(state, idmap, seen, **filters)
        return state, seen
    return load


def run(args: argparse.Namespace) -> int:
    from svdfill.distributed.process_group import init_from_env, shutdown
    from svdfill.distributed.sharded_fill import TorchrunExchange, TorchrunFill, serve_torchrun
    from svdfill.fill.dataset import is_dataset_path
    from svdfill.distributed.world import DistWorld
    from svdfill.launch import cmd_fill
    from svdfill.launch.errors import run_reporting_errors

    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, size, device, backend = init_from_env(want, args.backend)
    if size == 1:  # started without torchrun (or nproc 1): the one-process fill, no collectives
        try:
            args.device = str(device)
            return run_reporting_errors(lambda: cmd_fill.main(args))
        finally:
            shutdown()
    world = DistWorld(rank, size, device, backend)
    try:
        from svdfill.launch import fill_grid

        grid = fill_grid.grid_model_dir(args.model)
        if grid is not None:  # a grid run: every rank fills its own users around the ring
            args.device = str(device)
            return run_reporting_errors(lambda: fill_grid.main(args, grid, world))
        if is_dataset_path(args.out):  # every rank writes its part: no rank drives the others
            args.device = str(device)
            args.quiet = args.quiet or rank != 0
            return run_reporting_errors(lambda: cmd_fill.main(
                args, exchange=TorchrunExchange(world, args.item_split)))
        if rank != 0:
            serve_torchrun(world, _load(args))
            return 0
        args.device = str(device)
        sharded = TorchrunFill(world)
        try:
            return run_reporting_errors(lambda: cmd_fill.main(args, sharded=sharded))
        finally:
            sharded.close()  # release the other ranks: before the start (an early error) or after the last block
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
