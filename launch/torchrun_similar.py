"""Similar items under torchrun: ``torchrun --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_similar --model runs/NAME --k 20 --out items.parquet`` (what
``svdfill similar --launcher torchrun --nproc N`` runs).

Same options and the same Parquet file as ``svdfill similar``. The neighbour lists are a fill
of the unit (or raw) item table against itself (:mod:`svdfill.fill.similar`), so they shard
like the fill: rank r holds item shard r of that table on its device, rank 0 walks the blocks
of query items, gathers the W shard lists and merges them
(:class:`svdfill.distributed.sharded_fill.TorchrunFill`); the other ranks run
:func:`~svdfill.distributed.sharded_fill.serve_torchrun`. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from svdfill.launch import cmd_similar

    p = argparse.ArgumentParser(prog="python -m svdfill.launch.torchrun_similar",
                                description=__doc__.splitlines()[0])
    cmd_similar.add_arguments(p, launcher=False)
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")
    return p


def _load(args: argparse.Namespace):
    """``load(exclude) -> (state, seen)`` for the ranks > 0: the neighbour tables of the model
    and the diagonal as the seen set, exactly what rank 0's export shards."""
    def load(_exclude: bool):
        from svdfill.checkpoint import load_model
        from svdfill.fill.similar import diagonal_csr, neighbour_state

        state = neighbour_state(load_model(args.model).state, args.metric)
        return state, diagonal_csr(int(state["item_factors"].shape[0]))
    return load


def run(args: argparse.Namespace) -> int:
    from svdfill.distributed.process_group import init_from_env, shutdown
    from svdfill.distributed.sharded_fill import TorchrunFill, serve_torchrun
    from svdfill.distributed.world import DistWorld
    from svdfill.launch import cmd_similar
    from svdfill.launch.errors import run_reporting_errors

    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, size, device, backend = init_from_env(want, args.backend)
    try:
        args.device = str(device)
        if size == 1:  # started without torchrun (or nproc 1): the one-process export
            return run_reporting_errors(lambda: cmd_similar.main(args))
        world = DistWorld(rank, size, device, backend)
        if rank != 0:
            serve_torchrun(world, _load(args))
            return 0
        sharded = TorchrunFill(world)
        try:
            return run_reporting_errors(lambda: cmd_similar.main(args, sharded=sharded))
        finally:
            sharded.close()  # release the other ranks, also after an early error
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
