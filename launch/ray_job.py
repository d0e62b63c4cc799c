"""Ray entry points: ``python -m svdfill.launch.ray_job train|fill|similar …``, also as a Ray job::

    ray job submit --working-dir . -- python -m svdfill.launch.ray_job train --config … --out …
    ray job submit --working-dir . -- python -m svdfill.launch.ray_job fill --model … --k … --out …

``train`` runs Ray Train's TorchTrainer (v2) with ``ScalingConfig(num_workers, use_gpu)``
from ``[dist]``: every worker is one rank of the item-sharded trainer (the same code as
``svdfill train`` and torchrun), reports its metrics each epoch, and the main rank attaches
the resumable checkpoint (``ray.train.Checkpoint``). With ``FailureConfig(max_failures)``
a dead worker makes Ray restart the group, which resumes from the last checkpoint. The run
directory ends up as ``svdfill train`` leaves it; Ray's own records and checkpoints go to
``RunConfig.storage_path``: ``OUT/.ray`` by default, or ``--storage-path URI`` (``s3://``,
``gs://``, ``hdfs://`` through ``pyarrow.fs``, credentials and endpoint from the usual
environment, e.g. ``AWS_ENDPOINT_URL``): what a multi-node cluster needs, since a restarted
worker group on another node restores the last checkpoint from there.

``fill`` starts W Ray actors, each holding one item shard, and streams the merged top-k to
Parquet exactly as ``svdfill fill`` does (same file, same options). A grid run
(``layout = "grid"``) is filled by W Ray Train workers running the ring fill instead, each
writing its own part of ``--out DIR/``. ``similar`` does the same
for ``svdfill similar`` (each actor one item shard of the neighbour table).

Without ``--address`` this connects to the cluster the job runs in (``ray job submit``,
``RAY_ADDRESS``) or else starts a local one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# -- train ----------------------------------------------------------------------------------

def train_worker(config: dict) -> None:
    """One Ray Train worker = one rank of the trainer (runs on every worker, after restarts too)."""
    from svdfill.config import Config, from_dict
    from svdfill.distributed.ray_train import (ray_train_world, restore_checkpoint, set_worker_threads,
                                               worker_log)
    from svdfill.distributed.sharding import shard_by_rating_counts
    from svdfill.train import run_training

    cfg = from_dict(Config, config["cfg"], "ray_job train")
    set_worker_threads(cfg.dist.threads_per_worker)
    world = ray_train_world(cfg.train.device)
    restore_checkpoint(config["out"], world)  # after a restart: Ray's last checkpoint → OUT
    run_training(cfg, config["out"], world=world, reshard=shard_by_rating_counts,
                 resume=True, quiet=config["quiet"], log=worker_log)  # not print: once, not twice


def _train_config(args: argparse.Namespace):
    from svdfill.config import apply_overrides, resolve_data_path
    from svdfill.launch import cmd_train

    over = {"dist.num_workers": args.num_workers,
            "dist.max_failures": args.max_failures, "dist.backend": args.backend,
            "dist.use_gpu": True if args.use_gpu else None}
    # no --config: the general recipe, as `svdfill train` (not the bare Config() defaults)
    cfg = apply_overrides(cmd_train.train_config(args), over)
    if cfg.dist.use_gpu and not cfg.train.device.startswith("cuda"):
        cfg = apply_overrides(cfg, {"train.device": "cuda"})
    if cfg.train.device.startswith("cuda") and not cfg.dist.use_gpu:
        from svdfill.launch.errors import UserError

        raise UserError("train.device = cuda under Ray needs dist.use_gpu = true (--use-gpu): "
                        "Ray hands each worker its GPU")
    if cfg.data.path:
        # workers run in other folders (and on other nodes): pin the path the driver sees
        p = resolve_data_path(cfg.data.path)
        if p.exists():
            cfg = apply_overrides(cfg, {"data.path": str(p.resolve())})
    return cfg


def train(args: argparse.Namespace) -> int:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from svdfill import checkpoint as ck
    from svdfill.config import to_dict
    from svdfill.distributed.process_group import resolve_backend
    from svdfill.train.run_dir import prepare_run_dir

    import torch

    cfg = _train_config(args)
    out = Path(args.out).resolve()
    # Decide about OUT once, here; the workers then always "resume" (a restarted worker group
    # continues from the checkpoint; a fresh folder simply has none).
    action = prepare_run_dir(out, cfg, resume=args.resume, overwrite=args.overwrite)
    if action == "done":
        print(json.dumps(_summary_line(out)))
        return 0
    backend = resolve_backend(cfg.dist.backend,
                              torch.device("cuda" if cfg.dist.use_gpu else "cpu"))
    storage_path, storage_fs = _storage(args.storage_path, out)
    _ray_init(args.address)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "out": str(out), "quiet": args.quiet},
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=f"svdfill-{cfg.name}", storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.dist.max_failures)),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError once max_failures are spent
    if not (out / ck.SUMMARY_FILE).exists():
        raise RuntimeError(f"{out}: Ray Train finished but wrote no {ck.SUMMARY_FILE}")
    print(json.dumps(_summary_line(out)))
    return 0


def _storage(uri: str | None, out: Path):
    """``(storage_path, storage_filesystem)`` of Ray Train's RunConfig: ``OUT/.ray`` on the local
    disk, or a URI opened here through ``pyarrow.fs`` (the filesystem object travels to the
    workers with its endpoint and credentials, so they need no environment of their own).
    An unreachable or unknown location is a UserError naming it (credentials never shown)."""
    from svdfill.data.sources import is_uri
    from svdfill.launch.errors import UserError

    if not uri:
        return str(out / ".ray"), None
    if not is_uri(uri):
        return str(Path(uri).resolve()), None
    from svdfill.data.sources import open_filesystem, redact_uri

    try:
        fs, path = open_filesystem(uri)
        path = path.rstrip("/")
        fs.create_dir(path, recursive=True)
        fs.get_file_info(path)  # fails here, not in a worker, when the store is unreachable
    except (ValueError, OSError) as e:
        raise UserError(f"--storage-path {redact_uri(uri)}: cannot use this location: {e}") from None
    return path, fs


def _summary_line(out: Path) -> dict:
    from svdfill import checkpoint as ck

    s = json.loads((out / ck.SUMMARY_FILE).read_text())
    keys = ("val_rmse", "val_mae", "val_mse", "best_epoch", "epochs_run", "train_seconds",
            "n_train", "n_val", "n_val_cold", "world_size")
    return {k: s.get(k) for k in keys} | {"run_dir": str(out)}


def _ray_init(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    print(f"ray: connected to {ray.get_runtime_context().gcs_address} from node "
          f"{ray.util.get_node_ip_address()}", flush=True)


# -- fill -----------------------------------------------------------------------------------

def fill(args: argparse.Namespace) -> int:
    """``svdfill fill`` with the top-k computed by W Ray actors, one item shard each (a grid
    run: by a Ray Train worker group running the ring fill, :func:`fill_grid_on_ray`)."""
    from svdfill.checkpoint import load_model
    from svdfill.distributed.sharded_fill import RayFill
    from svdfill.launch import cmd_fill, fill_grid

    grid = fill_grid.grid_model_dir(args.model)
    if grid is not None:
        return fill_grid_on_ray(args, grid)
    cfg = load_model(args.model).config
    num_actors = args.num_actors or cfg.dist.num_workers
    use_gpu = bool(args.use_gpu or cfg.dist.use_gpu)
    _ray_init(args.address)

    def on_start(actors, shards):
        import ray

        if args.quiet:
            return
        where = ray.get([a.where.remote() for a in actors])
        nodes = len({w["node_id"] for w in where})
        print(f"ray: {len(actors)} fill actors on {nodes} node(s): " + ", ".join(
            f"items [{w['shard'][0]}, {w['shard'][1]}) on {w['ip']} pid {w['pid']} {w['device']} "
            f"{w['dtype']}"
            for w in where), flush=True)

    return cmd_fill.main(args, sharded=RayFill(num_actors, use_gpu=use_gpu, on_start=on_start,
                                               item_split=args.item_split))


def fill_grid_worker(config: dict) -> None:
    """One Ray Train worker of a grid run's fill = one rank of the torchrun ring fill
    (:func:`svdfill.launch.fill_grid.main`): its user block's top-k as the item blocks pass
    around the ring over Ray Train's process group, written as its own part of ``--out``."""
    from svdfill.distributed.ray_train import ray_train_world, set_worker_threads
    from svdfill.launch import fill_grid

    args = argparse.Namespace(**config["args"])
    set_worker_threads(0)
    world = ray_train_world(config["device"])
    fill_grid.main(args, fill_grid.grid_model_dir(args.model), world)


def fill_grid_on_ray(args: argparse.Namespace, grid: Path) -> int:
    """``ray_job fill`` of a grid run: ``--num-actors`` (default: the run's
    ``dist.num_workers``, else its saved W) Ray Train workers in one process group (gloo, or
    nccl with ``--use-gpu``) run the ring fill; each writes its own users' part of ``--out
    DIR/`` (a folder every worker's node sees), rank 0 the manifest last. Nothing passes
    through the driver but the summary. Ray Train keeps its run records in a temporary
    folder, removed afterwards (a fill has no checkpoints to restore)."""
    import shutil
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from svdfill.distributed.grid_checkpoint import read_layout
    from svdfill.fill.dataset import read_manifest
    from svdfill.launch import fill_grid
    from svdfill.launch.errors import UserError

    fill_grid.check_out(args.out)  # before Ray starts anything
    rec = read_layout(grid)
    dist_cfg = (rec.get("config") or {}).get("dist", {})
    workers = int(args.num_actors or dist_cfg.get("num_workers") or rec["layout"].world_size)
    use_gpu = bool(args.use_gpu or dist_cfg.get("use_gpu", False))
    out = str(Path(args.out).resolve()) + "/"  # workers run in other folders
    shown = args.out
    fields = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    fields.update(model=str(Path(args.model).resolve()), out=out, quiet=True,
                  device="cuda" if use_gpu else "cpu")
    for opt in ("users", "items_allow", "items_deny", "exclude", "foldin"):
        if fields.get(opt):
            fields[opt] = str(Path(fields[opt]).resolve())
    _ray_init(args.address)
    records = tempfile.mkdtemp(prefix="svdfill-ray-fill-")
    try:
        trainer = TorchTrainer(
            fill_grid_worker,
            train_loop_config={"args": fields, "device": fields["device"]},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name="svdfill-fill-grid", storage_path=records))
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:  # a worker's UserError / ExportError, said once
            raise UserError(f"the grid fill on Ray failed: {_root_cause(e)}") from None
    finally:
        shutil.rmtree(records, ignore_errors=True)
    m = read_manifest(out)
    if not args.quiet:
        print(f"svdfill: wrote top-{m['k']} of {m['n_users']:,} users to {shown} "
              f"({len(m['parts'])} part(s) by {workers} Ray Train workers, {m['rows']:,} rows)",
              flush=True)
    return 0


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message of a Ray Train failure."""
    seen = set()
    while True:
        nxt = e.__cause__ or e.__context__
        for attr in ("worker_failures", "error"):
            v = getattr(e, attr, None)
            if isinstance(v, dict) and v:
                nxt = next(iter(v.values()))
            elif isinstance(v, BaseException):
                nxt = v
        if nxt is None or id(nxt) in seen:
            return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        seen.add(id(nxt))
        e = nxt


def similar(args: argparse.Namespace) -> int:
    """``svdfill similar`` with the neighbour lists computed by W Ray actors, one item shard
    of the neighbour table each; the driver merges and writes the same file."""
    from svdfill.checkpoint import load_model
    from svdfill.distributed.sharded_fill import RayFill
    from svdfill.launch import cmd_similar

    cfg = load_model(args.model).config
    num_actors = args.num_actors or cfg.dist.num_workers
    _ray_init(args.address)
    sharded = RayFill(num_actors, use_gpu=bool(args.use_gpu or cfg.dist.use_gpu))
    try:
        return cmd_similar.main(args, sharded=sharded)
    finally:
        sharded.close()


# -- bench ----------------------------------------------------------------------------------

def bench_fill(args: argparse.Namespace) -> int:
    """Fill scaling over W Ray actors vs one process, on a random model (same run, same blocks).

    The baseline is :func:`svdfill.kernels.fill.fill_topk` in this process over the same user
    blocks; every W row also checks that its items equal the baseline's. Actor start-up
    (state shipped through the object store) is shown apart from the fill itself.
    """
    import time

    import torch

    from svdfill.data.csr import build_csr
    from svdfill.distributed.ray_fill import start_actors
    from svdfill.distributed.sharded_fill import RayFill
    from svdfill.kernels.fill import fill_topk

    U, I, d, k, B = args.users, args.items, args.factors, args.k, args.user_block
    g = torch.Generator().manual_seed(0)
    state = {"user_factors": torch.randn(U, d, generator=g) * 0.3,
             "item_factors": torch.randn(I, d, generator=g) * 0.3,
             "user_bias": torch.randn(U, generator=g) * 0.1,
             "item_bias": torch.randn(I, generator=g) * 0.1, "global_mean": torch.tensor(3.5)}
    n_seen = U * args.seen_per_user
    seen = build_csr(torch.randint(0, U, (n_seen,), generator=g),
                     torch.randint(0, I, (n_seen,), generator=g), U, n_items=I)
    blocks = [torch.arange(lo, min(lo + B, U)) for lo in range(0, U, B)]
    s_ptr, s_idx = seen

    t0 = time.perf_counter()
    ref = []
    for rows in blocks:
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        sub = (s_ptr[lo:hi + 1] - s_ptr[lo], s_idx[int(s_ptr[lo]):int(s_ptr[hi])])
        ref.append(fill_topk(state["user_factors"][lo:hi], state["item_factors"],
                             state["user_bias"][lo:hi], state["item_bias"], 3.5, k, sub))
    base = time.perf_counter() - t0
    print(f"fill top-{k}: {U:,} users x {I:,} items, d={d}, {int(s_ptr[-1]):,} seen pairs, "
          f"blocks of {B:,} users; torch threads {torch.get_num_threads()}")
    print(f"{'engine':<24}{'start s':>9}{'fill s':>9}{'Mpairs/s':>10}{'vs 1 proc':>10}"
          f"{'users differing':>17}{'max |Δscore|':>14}")
    print(f"{'1 process (fill_topk)':<24}{'-':>9}{base:>9.2f}{U * I / base / 1e6:>10.1f}{1.0:>10.2f}"
          f"{'-':>17}{'-':>14}")
    _ray_init(args.address)
    import ray

    for w in [int(x) for x in args.actors.split(",")]:
        t0 = time.perf_counter()
        actors, _ = start_actors(state, seen, w, k=k, num_cpus=args.actor_cpus)
        start = time.perf_counter() - t0
        fn = RayFill.from_actors(actors, k).blocks(lambda b: blocks[b], len(blocks))
        t0 = time.perf_counter()
        got = [fn(b) for b in range(len(blocks))]
        sec = time.perf_counter() - t0
        # the lists must be identical (the fill ranks the scores it returns, merge_topk
        # applies the same tie rule); count any user that differs and bound the scores
        diff = sum(int((a[1] != r[1]).any(1).sum()) for a, r in zip(got, ref))
        dmax = max(float((a[0] - r[0]).abs().max()) for a, r in zip(got, ref))
        print(f"{f'{w} Ray actor(s)':<24}{start:>9.2f}{sec:>9.2f}{U * I / sec / 1e6:>10.1f}"
              f"{base / sec:>10.2f}{f'{diff} of {U}':>17}{dmax:>14.2e}")
        for a in actors:
            ray.kill(a)
    return 0


# -- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from svdfill.launch import cmd_train

    p = argparse.ArgumentParser(prog="python -m svdfill.launch.ray_job",
                                description="Train or fill on a Ray cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    t = sub.add_parser("train", help="Ray Train TorchTrainer over item-sharded workers")
    cmd_train.add_arguments(t, launcher=False)
    t.add_argument("--num-workers", type=int, help="Ray Train workers; overrides dist.num_workers")
    t.add_argument("--use-gpu", action="store_true", help="one GPU per worker; sets dist.use_gpu")
    t.add_argument("--max-failures", type=int,
                   help="worker-group restarts from the last checkpoint; overrides dist.max_failures")
    t.add_argument("--backend", choices=("auto", "gloo", "nccl"),
                   help="torch.distributed backend; overrides dist.backend")
    t.add_argument("--address", help="Ray cluster address (default: the job's cluster, or a local one)")
    t.add_argument("--storage-path", metavar="URI",
                   help="Ray Train's storage for its records and checkpoints (default OUT/.ray): a "
                        "folder every node sees, or s3://bucket/prefix, gs://…, hdfs://…")
    f = sub.add_parser("fill", help="top-k fill over W Ray actors, one item shard each (a grid "
                                    "run: W Ray Train workers running the ring fill)")
    from svdfill.launch import cmd_fill

    cmd_fill.add_arguments(f, launcher=False)
    f.add_argument("--num-actors", type=int, help="item shards = Ray actors; overrides dist.num_workers")
    f.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    f.add_argument("--address", help="Ray cluster address (default: the job's cluster, or a local one)")
    s = sub.add_parser("similar", help="similar items over W Ray actors, one item shard each")
    from svdfill.launch import cmd_similar

    cmd_similar.add_arguments(s, launcher=False)
    s.add_argument("--num-actors", type=int, help="item shards = Ray actors; overrides dist.num_workers")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    s.add_argument("--address", help="Ray cluster address (default: the job's cluster, or a local one)")
    b = sub.add_parser("bench-fill", help="fill scaling over W Ray actors vs one process")
    b.add_argument("--users", type=int, default=100_000)
    b.add_argument("--items", type=int, default=3_000)
    b.add_argument("--factors", type=int, default=64)
    b.add_argument("--k", type=int, default=100)
    b.add_argument("--seen-per-user", type=int, default=20)
    b.add_argument("--user-block", type=int, default=10_000)
    b.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    b.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved per actor")
    b.add_argument("--address", help="Ray cluster address (default: a local one)")
    return p


def main(argv: list[str] | None = None) -> int:
    from svdfill.launch.errors import run_reporting_errors

    args = build_parser().parse_args(argv)
    fn = {"train": train, "fill": fill, "similar": similar, "bench-fill": bench_fill}[args.command]
    return run_reporting_errors(lambda: fn(args))


if __name__ == "__main__":
    sys.exit(main())
