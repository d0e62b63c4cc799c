"""Training under torchrun: ``torchrun --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_train --config … --out …``.

Same options and the same run directory as ``svdfill train``. Every rank reads the data and
makes the same split; the items are then cut into W contiguous shards balanced by their
training rating counts, rank r trains item shard r and all its ratings, and the user table
is kept in sync across ranks (DDP for autograd optimizers, summed deltas for Funk SGD).
Only rank 0 writes; checkpoints hold full tables, so ``--resume`` works at any world size.
With ``[dist] layout = "grid"`` each rank instead owns one block of users and one of items
(:mod:`svdfill.train.grid_run`): no rank holds a full table or all the ratings, every rank
writes its own blocks, and ``--resume`` re-blocks at any world size.
Backend: ``dist.backend`` (auto = nccl on CUDA, gloo on CPU); ``--device cuda`` gives rank r
the GPU ``cuda:LOCAL_RANK``. Without torchrun's environment it runs as one process.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from svdfill.launch import cmd_train

    p = argparse.ArgumentParser(prog="python -m svdfill.launch.torchrun_train",
                                description=__doc__.splitlines()[0])
    cmd_train.add_arguments(p, launcher=False)
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"),
                   help="torch.distributed backend; overrides dist.backend")
    return p


def train(args: argparse.Namespace) -> int:
    import json

    from svdfill.config import apply_overrides
    from svdfill.distributed.process_group import init_from_env, shutdown
    from svdfill.distributed.world import DistWorld
    from svdfill.distributed.sharding import shard_by_rating_counts
    from svdfill.launch import cmd_train
    from svdfill.train import run_training

    # no --config: the general recipe, as `svdfill train` (not the bare Config() defaults)
    cfg = apply_overrides(cmd_train.train_config(args), {"dist.backend": args.backend})
    cmd_train.check_device(cfg.train.device)
    rank, size, device, backend = init_from_env(cfg.train.device, cfg.dist.backend)
    try:
        world = DistWorld(rank, size, device, backend)
        summary = run_training(cfg, args.out, world=world, reshard=shard_by_rating_counts,
                               resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    finally:
        shutdown()
    if rank == 0:
        keys = ("val_rmse", "val_mae", "val_mse", "best_epoch", "epochs_run", "train_seconds",
                "n_train", "n_val", "n_val_cold", "world_size")
        print(json.dumps({k: summary.get(k) for k in keys} | {"run_dir": str(args.out)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from svdfill.launch.errors import run_reporting_errors

    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
