"""`svdfill bench plan`: ``svdfill plan``'s predictions against real runs.

For each layout (``items``; ``grid`` where :mod:`svdfill.distributed.grid` and its trainer
import) and solver (ALS sweeps; Funk SGD epochs on the items layout) and each W, a fresh job
of W processes (gloo over 127.0.0.1; W = 1 included) trains on the same small synthetic
data and measures, per rank:

- bytes sent per sweep/epoch: every ``World.all_reduce_sum`` is counted (its tensor's
  bytes, times the ring all-reduce's ``2(W−1)/W`` per rank, the convention the planner
  uses), and the grid's row exchanges count the rows they send to other ranks;
- (the ranks run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: on a
  shared machine spinning OpenMP threads make multi-threaded ranks many times slower);
- peak memory: the rise of the resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` once the input data are in memory) from just before the rank
  builds its training state until the end of the timed sweeps;
- seconds per sweep/epoch (after one warm-up sweep that builds the ALS plan), the slowest
  rank's: wall clock, and the rank process's CPU seconds (``time.process_time``, all its
  threads), which other processes' load on a shared machine does not inflate; the CPU
  prediction is :func:`svdfill.plan.estimate.cpu_seconds`.

Then it prints measured / predicted per row, with the predictions of
:mod:`svdfill.plan.estimate` under the profile measured at the start (``--profile`` to
reuse one). Bytes and memory are the mean over ranks (the planner predicts the expected
rank); time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

GRID_MISSING = "grid layout not available"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2,4", help="world sizes to run (default 1,2,4)")
    parser.add_argument("--users", type=int, default=40_000, help="synthetic users (default 40000)")
    parser.add_argument("--items", type=int, default=4_000, help="synthetic items (default 4000)")
    parser.add_argument("--ratings", type=int, default=1_000_000,
                        help="synthetic ratings (default 1000000)")
    parser.add_argument("--factors", type=int, default=32, help="factors d (default 32)")
    parser.add_argument("--sweeps", type=int, default=2, help="timed sweeps/epochs per run (default 2)")
    parser.add_argument("--solvers", default="als,sgd",
                        help="comma-separated: als, sgd (default both)")
    parser.add_argument("--layouts", default="items,grid", help="comma-separated: items, grid")
    parser.add_argument("--profile", metavar="FILE.json",
                        help="a profile from `svdfill plan --calibrate --out` (default: calibrate now)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")


def grid_available(solver: str = "als") -> bool:
    """Whether the grid layout's trainer of ``solver`` imports (distributed/grid.py with
    train/grid_als.py for ALS, train/dsgd.py for SGD)."""
    import importlib

    try:
        importlib.import_module("svdfill.distributed.grid")
        importlib.import_module("svdfill.train.grid_als" if solver == "als" else "svdfill.train.dsgd")
    except ImportError:
        return False
    return True


# -- one rank ------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Counting:
    """Wraps a world's ``all_reduce_sum`` to count the bytes and calls going through it."""

    def __init__(self, world):
        self.world = world
        self.bytes = 0
        self.calls = 0
        inner = world.all_reduce_sum

        def counted(t):
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return inner(t)

        world.all_reduce_sum = counted


def _config(spec: dict):
    from svdfill.config import Config, apply_overrides

    return apply_overrides(Config(), {
        "model.factors": spec["factors"], "train.solver": spec["solver"],
        "train.optimizer": "sgd", "train.batch_size": spec.get("batch_size", 1024),
        "train.lr": 0.005, "train.seed": 0})


def _data(spec: dict):
    from svdfill.config import SynthConfig
    from svdfill.data.synth import generate

    raw = generate(SynthConfig(n_users=spec["users"], n_items=spec["items"],
                               n_ratings=spec["ratings"], rank=8, seed=0))
    import torch

    return (torch.from_numpy(raw.users).to(torch.int32), torch.from_numpy(raw.items).to(torch.int32),
            torch.from_numpy(raw.ratings))


def _rank_main(rank: int, W: int, port: int, spec: dict, out) -> None:
    import torch
    import torch.distributed as dist

    from svdfill.distributed.world import DistWorld, core_share

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(core_share(W))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        users, items, ratings = _data(spec)
        _trim()
        world = DistWorld(rank, W, torch.device("cpu"), "gloo")
        run = _run_items if spec["layout"] == "items" else _run_grid
        res = run(world, spec, users, items, ratings)
        res["rank"] = rank
        out.put((rank, res))
        dist.barrier()
    except BaseException as e:  # reported to the parent with the rank's number
        import traceback

        out.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))
    finally:
        dist.destroy_process_group()


def _timed(world, solver, sweeps: int, counters) -> dict:
    """One warm-up sweep, then ``sweeps`` timed ones; the counters' growth per sweep."""
    import torch.distributed as dist

    solver.run_epoch("train", 1, False)
    _trim()
    base = {k: f() for k, f in counters.items()}
    _reset_peak()
    times, cpu = [], []
    for e in range(sweeps):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        solver.run_epoch("train", 2 + e, False)
        cpu.append(time.process_time() - c)
        dist.barrier()
        times.append(time.perf_counter() - t)
    out = {k: (f() - base[k]) / sweeps for k, f in counters.items()}
    out["seconds"] = sorted(times)[len(times) // 2]
    out["cpu_seconds"] = sorted(cpu)[len(cpu) // 2]
    return out


def _run_items(world, spec, users, items, ratings) -> dict:
    import torch

    from svdfill.data.dataset import Ratings
    from svdfill.distributed.sharding import balanced_shards, item_counts
    from svdfill.train.factory import make_solver
    from svdfill.train.shard import TrainShard

    U, I, W = spec["users"], spec["items"], world.world_size
    shards = balanced_shards(item_counts(items, I), W)
    w = world.with_shards(shards)
    lo, hi = shards[world.rank]
    cfg = _config(spec)
    _trim()
    rss0 = _rss_kib("VmRSS")
    _reset_peak()
    keep = torch.nonzero((items >= lo) & (items < hi)).squeeze(1)
    # the trainer's Ratings: a subset copy (a split's half), item ids made local
    local = Ratings(users[keep].clone(), (items[keep] - lo).to(torch.int32), ratings[keep].clone(), U, hi - lo)
    del keep
    count = _Counting(w)
    shard = TrainShard.build(w, local, I, lo, hi)
    solver = make_solver(cfg, w, shard)
    res = _timed(w, solver, spec["sweeps"], {"bytes": lambda: count.bytes, "calls": lambda: count.calls})
    res["peak"] = (_rss_kib("VmHWM") - rss0) * 1024.0
    res["sent"] = (2.0 * (W - 1) / W) * res.pop("bytes") if W > 1 else 0.0
    res["n_local"] = len(local)
    return res


def _run_grid(world, spec, users, items, ratings) -> dict:
    import torch

    from svdfill.distributed.grid import GridLayout, GridShard, grid_bounds, route_ratings

    U, I, W, r = spec["users"], spec["items"], world.world_size, world.rank
    lay = GridLayout(U, I, grid_bounds(U, W, torch.bincount(users.long(), minlength=U)),
                     grid_bounds(I, W, torch.bincount(items.long(), minlength=I)))
    cfg = _config(spec)
    _trim()
    rss0 = _rss_kib("VmRSS")
    _reset_peak()
    # each rank starts from its share of the ratings (what a sharded read leaves it)
    by_user, by_item = route_ratings(world, lay, users[r::W], items[r::W], ratings[r::W])
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
             torch.zeros(0, dtype=torch.float32))
    shard = GridShard(lay, r, W, by_user, by_item, empty)
    if spec["solver"] == "als":
        from svdfill.train.grid_als import GridALSSolver

        solver = GridALSSolver(cfg, world, shard)
        res = _timed(world, solver, spec["sweeps"], {"sent": lambda: solver.bytes["sweep_sent"]})
        res["calls"] = 2 if W > 1 else 0  # the two RowExchange fetches
    else:
        from svdfill.train.dsgd import DSGDSolver

        solver = DSGDSolver(cfg, world, shard)
        res = _timed(world, solver, spec["sweeps"], {"sent": lambda: solver.ring.bytes_sent,
                                                     "calls": lambda: 2 * solver.ring.shifts})
    res["peak"] = (_rss_kib("VmHWM") - rss0) * 1024.0
    res["n_local"] = int(by_user[2].numel())
    return res


def measure(spec: dict, W: int, timeout: float = 1800.0) -> list[dict]:
    """Run one job of ``W`` ranks (fresh processes) and return each rank's measurements."""
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, W, port, spec, out)) for r in range(W)]
    # idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread
    # waits for a descheduled peer and the step takes many times longer (an explicit
    # OMP_WAIT_POLICY in the environment is kept)
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = saved or "PASSIVE"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]
    got = {}
    try:
        for _ in procs:
            rank, res = out.get(timeout=timeout)
            got[rank] = res
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {g['error']}" for r, g in sorted(got.items()) if "error" in g]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [got[r] for r in sorted(got)]


# -- the table -----------------------------------------------------------------------------------------

def check_rows(spec_base: dict, workers: list[int], layouts: list[str], solvers: list[str],
               profile, *, runner=measure, log=print) -> list[dict]:
    """Measured vs predicted for each (layout, solver, W) (grid + sgd is DSGD). Grid rows
    say :data:`GRID_MISSING` when the grid code does not import. ``runner(spec, W)`` runs
    one job and returns its ranks' measurements (:func:`measure`)."""
    from svdfill.plan.estimate import Problem, cpu_seconds, estimate

    rows = []
    for layout in layouts:
        for solver in solvers:
            for W in workers:
                row = {"layout": layout, "solver": solver, "W": W}
                if layout == "grid" and not grid_available(solver):
                    row["status"] = GRID_MISSING
                    rows.append(row)
                    continue
                spec = dict(spec_base, layout=layout, solver=solver)
                t = time.perf_counter()
                per = runner(spec, W)
                log(f"  ran {layout}/{solver} W={W} in {time.perf_counter() - t:.1f} s")
                p = Problem(n_users=spec["users"], n_items=spec["items"], n_ratings=spec["ratings"],
                            factors=spec["factors"], workers=W, solver=solver, optimizer="sgd",
                            batch_size=spec.get("batch_size", 1024))
                e = estimate(p, profile, layout)
                mean = lambda k: sum(r[k] for r in per) / len(per)  # noqa: E731
                row.update(status="ok", sent=mean("sent"), sent_max=max(r["sent"] for r in per),
                           sent_pred=e.sweep_bytes, peak=mean("peak"), peak_pred=e.memory_total,
                           seconds=max(r["seconds"] for r in per),
                           seconds_pred=e.sweep_time["total"],
                           cpu=max(r["cpu_seconds"] for r in per),
                           cpu_pred=cpu_seconds(e, profile, W), calls=per[0]["calls"],
                           calls_pred=e.sweep_collectives)
                rows.append(row)
    return rows


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "exact" if a == 0 else "inf"
    return f"{a / b:.2f}"


def render(rows: list[dict]) -> str:
    from svdfill.plan.estimate import fmt_bytes, fmt_seconds

    head = (f"{'layout':6s} {'solver':6s} {'W':>2s} | {'sent/rank':>10s} {'predicted':>10s} {'ratio':>5s} | "
            f"{'peak mem':>10s} {'predicted':>10s} {'ratio':>5s} | {'s/sweep':>9s} {'predicted':>9s} "
            f"{'ratio':>5s} | {'cpu s':>9s} {'predicted':>9s} {'ratio':>5s} | {'calls':>6s} {'pred':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['layout']:6s} {r['solver']:6s} {r['W']:2d} | {r['status']}")
            continue
        lines.append(
            f"{r['layout']:6s} {r['solver']:6s} {r['W']:2d} | {fmt_bytes(r['sent']):>10s} "
            f"{fmt_bytes(r['sent_pred']):>10s} {_ratio(r['sent'], r['sent_pred']):>5s} | "
            f"{fmt_bytes(r['peak']):>10s} {fmt_bytes(r['peak_pred']):>10s} "
            f"{_ratio(r['peak'], r['peak_pred']):>5s} | {fmt_seconds(r['seconds']):>9s} "
            f"{fmt_seconds(r['seconds_pred']):>9s} {_ratio(r['seconds'], r['seconds_pred']):>5s} | "
            f"{fmt_seconds(r['cpu']):>9s} {fmt_seconds(r['cpu_pred']):>9s} "
            f"{_ratio(r['cpu'], r['cpu_pred']):>5s} | {r['calls']:6.0f} {r['calls_pred']:6d}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from svdfill.launch.errors import UserError
    from svdfill.plan.profile import calibrate, load_profile

    try:
        workers = [int(x) for x in str(args.workers).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--workers {args.workers!r}: comma-separated integers") from None
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if not workers or min(workers) < 1:
        raise UserError("--workers: at least one world size, each >= 1")
    if any(s not in ("als", "sgd") for s in solvers) or any(x not in ("items", "grid") for x in layouts):
        raise UserError("--solvers takes als,sgd and --layouts items,grid")
    if args.profile:
        profile = load_profile(args.profile)
        print(f"profile {args.profile}: {json.dumps(profile.to_json())}")
    else:
        print("calibrating this machine ...")
        profile = calibrate(k=args.factors + 1)
        print(f"profile: {json.dumps(profile.to_json())}")
    spec = {"users": args.users, "items": args.items, "ratings": args.ratings,
            "factors": args.factors, "sweeps": args.sweeps}
    rows = check_rows(spec, workers, layouts, solvers, profile)
    print(f"svdfill plan vs measured: {args.users:,} users x {args.items:,} items x "
          f"{args.ratings:,} ratings, d={args.factors}, gloo on this CPU ({os.cpu_count()} cores); "
          "bytes and memory: mean over ranks; time: slowest rank, median of the timed sweeps")
    print(render(rows))
    if args.json:
        from pathlib import Path

        p = Path(args.json)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"spec": spec, "profile": profile.to_json(), "rows": rows}, indent=2))
        os.replace(tmp, p)
    return 0
