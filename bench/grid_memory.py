"""Per-rank memory of one ALS sweep, grid layout vs item layout (issue 16's measurement).

Run under torchrun (gloo on loopback), one run per (layout, W)::

    torchrun --standalone --nproc_per_node=W -m svdfill.bench.grid_memory \\
        --ratings FILE.parquet --layout grid|items --factors 16 [--out result.json]

Each rank reads its share of the file (:mod:`svdfill.distributed.ingest`), builds its
layout's shard and solver, runs one ALS sweep and one validation pass, and reports:

- ``table_bytes``: the model tables it holds (grid: its user and item blocks; items: the
  whole user table and its item shard), float32;
- ``ratings_bytes``: the ratings tensors it holds (grid: ``by_user`` + ``by_item`` +
  its validation ratings; items: its item shard's training + validation ratings);
- ``peak_rss_bytes``: the process's peak resident set (``ru_maxrss``), everything included
  (torch itself, reading, the ALS plans), ``base_rss_bytes`` before reading and
  ``peak_rss_after_read_bytes`` once the shard and the solver are built (before the sweep);
- ``sweep_seconds`` and, for the grid, ``sweep_bytes_sent`` / ``sweep_bytes_received``.

Rank 0 prints one JSON object with every rank's figures (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch.distributed as dist


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure(cfg, world, layout: str) -> dict:
    """This rank's figures for one sweep of ``cfg`` on ``layout`` (collective)."""
    base = _rss_peak()
    t0 = time.perf_counter()
    if layout == "grid":
        from svdfill.train.grid_als import GridALSSolver
        from svdfill.train.grid_run import grid_shard

        shard, _, _ = grid_shard(cfg, world, None, True, print)
        solver = GridALSSolver(cfg, world, shard)
        ratings_b = shard.tensor_bytes()
        t_read = time.perf_counter() - t0
        read_peak = _rss_peak()
        t1 = time.perf_counter()
        solver.run_epoch("select", 1, False)
        sweep = time.perf_counter() - t1
        val = solver.evaluate("val")
        out = {"table_bytes": solver.tensor_bytes(), "ratings_bytes": ratings_b,
               "sweep_bytes_sent": solver.bytes["sweep_sent"],
               "sweep_bytes_received": solver.bytes["sweep_received"],
               "user_block": list(shard.user_block), "item_block": list(shard.item_block)}
    else:
        from svdfill.distributed import ingest
        from svdfill.distributed.sharding import select_shard
        from svdfill.train.factory import make_solver
        from svdfill.train.shard import DeviceRatings, TrainShard

        got = ingest.read_sharded(cfg.data, world)
        w = world.with_shards(got.shards)
        lo, hi = got.shards[world.rank]
        n_items = got.train.n_items
        tr = select_shard(got.train, lo, hi)
        va = select_shard(got.val, lo, hi)
        del got
        shard = TrainShard.build(w, tr, n_items, lo, hi)
        solver = make_solver(cfg, w, shard)
        vdata = DeviceRatings.of(va, w.device)
        d = shard.ratings
        ratings_b = _nbytes(d.users, d.items, d.ratings, vdata.users, vdata.items, vdata.ratings)
        del tr, va
        t_read = time.perf_counter() - t0
        read_peak = _rss_peak()
        t1 = time.perf_counter()
        solver.run_epoch("select", 1, False)
        sweep = time.perf_counter() - t1
        val = solver.evaluate(vdata)
        m = solver.model
        out = {"table_bytes": _nbytes(m.user_factors, m.user_bias, m.item_factors, m.item_bias),
               "ratings_bytes": ratings_b, "item_shard": [lo, hi]}
    return {"rank": world.rank, **out, "tables_plus_ratings": out["table_bytes"] + out["ratings_bytes"],
            "peak_rss_bytes": _rss_peak(), "base_rss_bytes": base,
            "peak_rss_after_read_bytes": read_peak,
            "read_seconds": round(t_read, 2), "sweep_seconds": round(sweep, 2),
            "val_rmse": val["rmse"]}


def main(argv: list[str] | None = None) -> int:
    from svdfill.config import Config, apply_overrides
    from svdfill.distributed.process_group import init_from_env, shutdown
    from svdfill.distributed.world import DistWorld

    p = argparse.ArgumentParser(prog="python -m svdfill.bench.grid_memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--ratings", required=True, help="ratings file (Parquet or text)")
    p.add_argument("--layout", choices=("grid", "items"), required=True)
    p.add_argument("--factors", type=int, default=16)
    p.add_argument("--out", help="also write the JSON here (rank 0)")
    args = p.parse_args(argv)
    cfg = apply_overrides(Config(), {"data.path": args.ratings, "model.factors": args.factors,
                                     "train.solver": "als", "train.epochs": 1,
                                     "dist.layout": args.layout, "model.init_std": 0.1})
    rank, size, device, backend = init_from_env("cpu", "gloo")
    if not dist.is_initialized():
        print("run under torchrun", file=sys.stderr)
        return 2
    try:
        world = DistWorld(rank, size, device, backend)
        mine = measure(cfg, world, args.layout)
        every = [None] * size
        dist.all_gather_object(every, mine)
    finally:
        shutdown()
    if rank == 0:
        res = {"layout": args.layout, "world_size": size, "factors": args.factors,
               "ratings": args.ratings,
               "max_tables_plus_ratings": max(r["tables_plus_ratings"] for r in every),
               "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in every), "ranks": every}
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            from svdfill.checkpoint import atomic_write_text

            atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
