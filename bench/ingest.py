"""`svdfill bench ingest`: reading a ratings dataset in a world of W ranks, each rank its
share (:mod:`svdfill.distributed.ingest`), against the baseline measured in the same run:
one process reading everything — which is also what every rank of a W-rank job did before,
so its memory is the per-rank memory of the old path at any W.

Each row is measured in fresh processes (gloo over 127.0.0.1 for W > 1): wall time of the
read (parse, id map, split, routing to item shards), ratings and bytes read per rank, and
each rank's peak resident memory (``ru_maxrss``: the process's whole life, imports
included). Make a dataset with ``svdfill synth`` and split it into parts, or point it at
any Parquet/text dataset.
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratings", required=True,
                        help="a file, folder of parts, glob or URI (what data.path takes)")
    parser.add_argument("--config", default=None,
                        help="TOML config or preset whose [data] section applies (default: none)")
    parser.add_argument("--workers", default="2",
                        help="comma-separated world sizes to measure (default 2); the "
                             "one-process baseline always runs")


def _baseline(data, out) -> None:
    import resource

    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split

    t = time.perf_counter()
    ratings, _ = load_dataset(data)
    split(ratings, how=data.split, fraction=data.val_fraction, seed=data.split_seed)
    out.put((0, {"seconds": time.perf_counter() - t, "ratings": len(ratings), "bytes": None,
                 "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                 "kept": len(ratings)}))


def _rank(rank: int, world_size: int, port: int, data, out) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from svdfill.distributed.ingest import read_sharded
    from svdfill.distributed.world import DistWorld

    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        world = DistWorld(rank, world_size, torch.device("cpu"), "gloo")
        dist.barrier()
        t = time.perf_counter()
        got = read_sharded(data, world)
        dist.barrier()
        seconds = time.perf_counter() - t
        out.put((rank, {"seconds": seconds, "bytes": got.bytes_read,
                        "ratings": None, "kept": len(got.train) + len(got.val),
                        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    finally:
        dist.destroy_process_group()


def _measure(target, world_size: int, *args) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # world_size 0: one plain process (the baseline), no group
    procs = [ctx.Process(target=target,
                         args=((r, world_size, port) if world_size else ()) + args + (out,))
             for r in range(max(world_size, 1))]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a measured process exited with code {p.exitcode}")
    return [got[r] for r in sorted(got)]


def main(args: argparse.Namespace) -> int:
    from svdfill.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(args.config), {"data.path": args.ratings})
    sizes = [int(x) for x in str(args.workers).split(",") if x.strip()]
    rows = [("one process reads all (before: every rank)", 1, _measure(_baseline, 0, cfg.data))]
    for w in sizes:
        rows.append((f"each rank its share ({w} ranks)", w, _measure(_rank, w, cfg.data)))
    b = rows[0][2][0]
    print(f"Ingest of {args.ratings}: {b['ratings']:,} ratings; per rank: max over ranks")
    print(f"{'how':46s} {'W':>2s} {'seconds':>8s} {'ratings kept':>13s} {'bytes read':>11s} "
          f"{'peak RSS':>9s} {'RSS / base':>10s}")
    for name, w, per in rows:
        rss = max(p["rss"] for p in per)
        kept = max(p["kept"] for p in per)
        nbytes = max((p["bytes"] or 0) for p in per)
        print(f"{name:46s} {w:2d} {max(p['seconds'] for p in per):8.2f} {kept:13,d} "
              f"{(f'{nbytes / 2**20:,.0f} MiB' if nbytes else 'all'):>11s} "
              f"{rss / 2**30:7.2f} G {rss / b['rss']:10.2f}")
    return 0
