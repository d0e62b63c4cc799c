"""The fill under torchrun: ``torchrun --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_fill --model runs/NAME --k 100 --out recs.parquet``.

Same options and the same Parquet file as ``svdfill fill``. Rank r holds item shard r
(equal contiguous shards) on its device (``cuda:LOCAL_RANK`` when CUDA is there); rank 0
runs the export and, for each user block, sends the block's users to every rank, gathers
their shard top-k lists with ``torch.distributed`` and merges them
(:func:`svdfill.distributed.gather.gather_topk`). Only rank 0 writes. ``--full`` is a
one-process job (``svdfill fill --full``).
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


class ShardFill:
    """This rank's item shard of a model, ready to answer per-block top-k requests."""

    def __init__(self, state: dict, seen, shard: tuple[int, int], device: torch.device,
                 k: int, dtype, memory_budget):
        from svdfill.distributed.ray_fill import csr_restrict

        lo, hi = shard
        self.lo, self.k, self.dtype, self.budget = lo, k, dtype, memory_budget
        self.device = device
        self.P = state["user_factors"].to(device, torch.float32)
        self.bu = state["user_bias"].to(device, torch.float32)
        self.Q = state["item_factors"][lo:hi].to(device, torch.float32)
        self.bi = state["item_bias"][lo:hi].to(device, torch.float32)
        self.mu = float(state["global_mean"])
        self.seen = None if seen is None else csr_restrict(seen[0].numpy(), seen[1].numpy(), lo, hi)

    def topk(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from svdfill.kernels.fill import csr_take, fill_topk

        rows = rows.to(torch.int64).cpu()
        sub = None if self.seen is None else csr_take(self.seen[0], self.seen[1], rows)
        r = rows.to(self.device)
        return fill_topk(self.P.index_select(0, r), self.Q, self.bu.index_select(0, r), self.bi,
                         self.mu, self.k, sub, item_offset=self.lo, dtype=self.dtype,
                         memory_budget=self.budget)


def _serve(world, model_path: str) -> None:
    """Ranks > 0: follow rank 0's requests until it says stop."""
    from svdfill.checkpoint import load_model, load_seen
    from svdfill.distributed.gather import gather_topk
    from svdfill.distributed.sharding import even_shards

    msg = world.broadcast_object(None)
    if msg is None or msg["cmd"] != "start":
        return
    model = load_model(model_path)
    seen = load_seen(model.path.parent)["all"] if msg["exclude"] else None
    shards = even_shards(model.n_items, world.world_size)
    shard = ShardFill(model.state, seen, shards[world.rank], world.device, msg["k"],
                      msg["dtype"], msg["budget"])
    while True:
        msg = world.broadcast_object(None)
        if msg is None or msg["cmd"] != "block":
            return
        s, i = shard.topk(msg["rows"])
        gather_topk(s, i, world.world_size, world.rank, world.comm_device)


def torch_sharded(world, started: list):
    """The ``sharded`` hook of :func:`svdfill.launch.cmd_fill.main` on rank 0."""
    from svdfill.distributed.gather import gather_topk
    from svdfill.distributed.sharding import even_shards

    def sharded(state, seen, k, device, dtype, memory_budget):
        world.broadcast_object({"cmd": "start", "k": k, "dtype": dtype, "budget": memory_budget,
                                "exclude": seen is not None})
        started.append(True)
        shards = even_shards(int(state["item_factors"].shape[0]), world.world_size)
        shard = ShardFill(state, seen, shards[0], world.device, k, dtype, memory_budget)

        def factory(rows_of, n_blocks):
            def fn(b: int):
                rows = torch.as_tensor(rows_of(b)).to(torch.int64).cpu()
                world.broadcast_object({"cmd": "block", "rows": rows})
                s, i = shard.topk(rows)
                return gather_topk(s, i, world.world_size, world.rank, world.comm_device)
            return fn
        return factory

    return sharded


def run(args: argparse.Namespace) -> int:
    from svdfill.distributed.process_group import init_from_env, shutdown
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
        if rank != 0:
            _serve(world, args.model)
            return 0
        args.device = str(device)
        started: list = []
        try:
            return run_reporting_errors(lambda: cmd_fill.main(args, sharded=torch_sharded(world, started)))
        finally:
            # release the other ranks: before the start (an early error) or after the last block
            world.broadcast_object({"cmd": "stop"} if started else None)
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
