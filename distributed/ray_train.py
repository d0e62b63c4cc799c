"""Plumbing for training under Ray Train (v2 TorchTrainer): the world of a Ray Train worker
and the checkpoint round trip, so the worker function itself stays a few lines.

Ray Train has already started the torch.distributed group (gloo, or nccl with use_gpu) when
the worker function runs; :func:`ray_train_world` only reads it. Every epoch each worker calls
``ray.train.report``; the main rank attaches the resumable ``checkpoint.pt`` the trainer
just wrote as a :class:`ray.train.Checkpoint`, which Ray copies to ``RunConfig.storage_path``.
After a worker dies, Ray restarts the whole group and :func:`restore_checkpoint` hands the
latest reported checkpoint back to the trainer. A grid-layout run (``[dist] layout =
"grid"``) reports and restores its ``grid_checkpoint/`` folder (per-rank blocks +
``layout.json``) instead of ``checkpoint.pt``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from svdfill.checkpoint import CHECKPOINT_FILE
from svdfill.distributed.world import DistWorld, core_share

_RESUMED_FROM_EPOCH = 0
"""Set by :func:`restore_checkpoint` in this worker process (a restarted group is new processes)."""


class RayTrainWorld(DistWorld):
    """A :class:`DistWorld` whose epoch reports go to Ray Train."""

    def report_epoch(self, metrics: dict, checkpoint_dir=None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        # 0 on a fresh start; after a restart, the epoch of the checkpoint it resumed from
        clean["resumed_from_epoch"] = _RESUMED_FROM_EPOCH
        if checkpoint_dir is None or not self.is_main:
            ray.train.report(clean, checkpoint=None)
            return
        if (Path(checkpoint_dir) / GRID_LAYOUT_FILE).exists():
            _report_grid(clean, Path(checkpoint_dir))
            return
        src = Path(checkpoint_dir) / CHECKPOINT_FILE
        if not src.exists():
            ray.train.report(clean, checkpoint=None)
            return
        # Report a folder holding only the resumable state (not model.pt, seen.pt, ...).
        with tempfile.TemporaryDirectory(prefix="svdfill-ckpt-") as tmp:
            dst = Path(tmp) / CHECKPOINT_FILE
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp))


GRID_LAYOUT_FILE = "layout.json"
GRID_CHECKPOINT_DIR = "grid_checkpoint"


def _report_grid(metrics: dict, ckdir: Path) -> None:
    """Report a grid checkpoint folder (:mod:`svdfill.train.grid_loop`): ``layout.json`` and
    the rank files it names, as ``grid_checkpoint/`` of the reported folder. The ranks'
    files are read from the run directory, which the ranks share (one node, or a shared
    file system)."""
    import json

    import ray.train

    names = json.loads((ckdir / GRID_LAYOUT_FILE).read_text())["names"]
    with tempfile.TemporaryDirectory(prefix="svdfill-ckpt-") as tmp:
        dst = Path(tmp) / GRID_CHECKPOINT_DIR
        dst.mkdir()
        files = [p for p in ckdir.glob("*.rank-*-of-*.pt") if p.name.split(".rank-", 1)[0] in names]
        for src in files + [ckdir / GRID_LAYOUT_FILE]:
            try:
                os.link(src, dst / src.name)
            except OSError:
                shutil.copy2(src, dst / src.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore_grid(src: Path, run_dir: Path) -> int | None:
    """Replace ``run_dir/grid_checkpoint`` by Ray's copy ``src`` (copied beside it, then
    swapped in); returns its epoch."""
    import json

    dst = run_dir / GRID_CHECKPOINT_DIR
    tmp = run_dir / (GRID_CHECKPOINT_DIR + ".restoring")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = run_dir / (GRID_CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return int(json.loads((dst / GRID_LAYOUT_FILE).read_text())["training"]["epoch"])


def worker_log(line: str) -> None:
    """Print one line from a Ray Train worker, once.

    Ray Train v2 replaces ``builtins.print`` in its workers with a function that sends the
    line to the root logger (its structured train log), and with ``log_to_driver`` the
    driver shows the worker's stdout as well — a ``print`` from a worker (the trainer's
    "wall time" line) reached the driver twice. Writing to the worker's stdout itself skips
    the patched ``print``; log_to_driver carries the line once.
    """
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ray_train_world(device: str = "cpu") -> RayTrainWorld:
    """The world of this Ray Train worker (rank, size, device from Ray Train's context)."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    if torch.device(device).type == "cuda":
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return RayTrainWorld(rank, size, dev, backend)


def set_worker_threads(requested: int = 0) -> int:
    """Give this Ray Train worker ``requested`` torch intra-op threads, or (0) an equal share
    of its node's cores among the node's workers, and return the number. Ray starts a
    worker with OMP_NUM_THREADS=1 unless told otherwise, which would leave a one-GPU box's
    other cores idle through the data preparation, the CPU-side sorts and the export."""
    import ray.train

    n = requested if requested > 0 else core_share(ray.train.get_context().get_local_world_size())
    torch.set_num_threads(n)
    return n


def restore_checkpoint(run_dir, world: RayTrainWorld) -> bool:
    """After a restart, put the latest checkpoint Ray has (the last one reported) at
    ``run_dir/checkpoint.pt`` (main rank; atomic), so the trainer resumes from it. Returns
    whether there was one. Ray's copy is the one to trust: the run directory may have been
    written by a rank that died, or live on another node.
    """
    import ray.train

    from svdfill import checkpoint as ck

    ckpt = ray.train.get_checkpoint()
    found = ckpt is not None
    if found:
        ckpt_epoch = None
        with ckpt.as_directory() as d:
            src = Path(d) / CHECKPOINT_FILE
            grid = Path(d) / GRID_CHECKPOINT_DIR
            if (grid / GRID_LAYOUT_FILE).exists() and world.is_main:  # a grid run's folder
                ckpt_epoch = _restore_grid(grid, Path(run_dir))
            elif src.exists() and world.is_main:
                ck.atomic_write(Path(run_dir) / CHECKPOINT_FILE,
                                lambda tmp: shutil.copyfile(src, tmp))
                state = ck.load_training_state(run_dir)
                ckpt_epoch = state.epoch if state is not None else None
        epoch = world.broadcast_object(ckpt_epoch)
        global _RESUMED_FROM_EPOCH
        _RESUMED_FROM_EPOCH = int(epoch or 0)
        if world.is_main:
            worker_log(f"ray: restarted; resuming from the checkpoint of epoch {epoch} ({ckpt.path})")
    return found
