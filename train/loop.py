"""The epoch loop of biased-MF training, shared by `svdfill train`, torchrun and Ray Train.

One code path for one process and many: everything that differs between them goes
through the :class:`~svdfill.distributed.world.World` hooks, which are the identity for the
default single-process ``World()``:

- the item tables hold only this rank's shard ``[lo, hi)`` and the loop sees only the
  ratings of those items, with item ids made local (``items − lo``);
- each method's epoch (:mod:`svdfill.train.solver` and its subclasses) keeps the ranks'
  replicated user tables equal: DDP, summed deltas or summed normal equations;
- metric sums are all-reduced, so every rank sees the same validation RMSE and takes the
  same early-stopping decision;
- checkpoints hold full tables (``world.gather_items``) written by the main rank only, so a
  run resumes at another world size (item rows are sliced back to the new shard).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from svdfill import checkpoint as ck
from svdfill.checkpoint import BestEpoch, TrainingState
from svdfill.config import Config, to_dict
from svdfill.data.dataset import Ratings
from svdfill.distributed.sharding import select_shard
from svdfill.distributed.world import World
from svdfill.train.factory import make_solver
from svdfill.train.shard import (DeviceRatings, TrainShard, gather_full, n_global, phase_seed,
                                 rating_counts, slice_state)
from svdfill.train.solver import Solver

_NO_METRICS = {"mse": math.nan, "rmse": math.nan, "mae": math.nan}


@dataclass
class FitResult:
    """What :func:`fit` returns on every rank.

    state: the final model's five tensors with full item tables (main rank; ``None``
    elsewhere), on CPU. summary: the run's summary dict (same on every rank). history: one
    dict per epoch (the lines of ``metrics.jsonl``).
    """

    state: dict[str, torch.Tensor] | None
    summary: dict
    history: list[dict] = field(default_factory=list)


@dataclass
class PhaseResult:
    """What one phase (selection or refit) leaves.

    state: the kept model's five tensors (this rank's shard, on the device): the best
    epoch's when there is a validation set, else the last. best_epoch: 1-based. best: the
    best epoch's validation metrics (None without epochs). epochs_run: the last epoch done.
    seconds: training time of the phase (resumed runs included). global_mean: μ of the
    phase's training ratings. train_metrics: of the kept model on all its training ratings.
    """

    state: dict[str, torch.Tensor]
    best_epoch: int
    best: dict[str, float] | None
    epochs_run: int
    stopped_early: bool
    seconds: float
    global_mean: float
    train_metrics: dict[str, float]


def fit(cfg: Config, train: Ratings, val: Ratings | None, world: World | None = None,
        run_dir: str | os.PathLike | None = None, *, resume: bool = False, quiet: bool = False,
        log: Callable[[str], None] = print, extra_checkpoint: dict | None = None) -> FitResult:
    """Train biased MF on ``train``, early-stopping on ``val``; optionally refit.

    train, val: :class:`~svdfill.data.dataset.Ratings` over the full id space (``n_items`` =
    the whole catalogue). Only the ratings of this rank's item shard are used (all of them
    for ``World()``), so a rank may be given everything or just its shard. ``val`` may be
    ``None`` or empty (no early stopping; the last epoch is kept).
    world: where this process stands; ``None`` = ``World(device=cfg.train.device)``.
    run_dir: where ``checkpoint.pt`` (every ``train.checkpoint_every`` epochs) and
    ``metrics.jsonl`` go (main rank); ``None`` = keep nothing on disk.
    resume: continue from ``run_dir/checkpoint.pt`` when there is one; the result then
    equals an uninterrupted run's (CPU; same config and world size).
    extra_checkpoint: more plain entries stored in every checkpoint (e.g. the id map).

    Selection phase: up to ``train.epochs`` epochs, early stopping after ``train.patience``
    epochs without a validation RMSE better by ``train.min_delta``; the best epoch's
    weights are restored. With ``train.refit`` (and a non-empty ``val``) a second phase
    trains from scratch on train+val for the best epoch count; its weights are the result.
    """
    world = world or World(device=torch.device(cfg.train.device))
    run_dir = Path(run_dir) if run_dir is not None else None
    n_items = train.n_items
    lo, hi = world.item_range(n_items)
    tr_loc = select_shard(train, lo, hi)
    va_loc = select_shard(val, lo, hi) if val is not None else None
    ckpt: TrainingState | None = None
    if resume and run_dir is not None:
        ckpt = world.broadcast_object(ck.load_training_state(run_dir) if world.is_main else None)
    carry = {"config": to_dict(cfg), **(extra_checkpoint or {})}
    history: list[dict] = []
    n_val = n_global(world, va_loc) if va_loc is not None else 0
    phase_args = dict(n_items=n_items, lo=lo, hi=hi, run_dir=run_dir, history=history,
                      quiet=quiet, log=log)

    if ckpt is not None and ckpt.phase == "refit":
        select = ckpt.extra["select"]
    else:
        sel = _run_phase("select", cfg, world, tr_loc, va_loc, cfg.train.epochs, ckpt=ckpt,
                         carry=carry, **phase_args)
        select = {"best_epoch": sel.best_epoch, "epochs_run": sel.epochs_run,
                  "stopped_early": sel.stopped_early, "seconds": sel.seconds,
                  "val": sel.best, "train": sel.train_metrics, "global_mean": sel.global_mean}
        final = sel

    refit = None
    if cfg.train.refit and n_val > 0:
        both = tr_loc.cat(va_loc)
        if ckpt is None or ckpt.phase != "refit":
            ckpt = None  # the refit starts from scratch (its resume restores the history)
        carry = {**carry, "select": select}
        ref = _run_phase("refit", cfg, world, both, None, int(select["best_epoch"]), ckpt=ckpt,
                         carry=carry, **phase_args)
        refit = {"epochs": ref.epochs_run, "n_train": n_global(world, both),
                 "seconds": ref.seconds, "global_mean": ref.global_mean,
                 **{f"train_{k}": v for k, v in ref.train_metrics.items()}}
        final = ref

    state, _ = gather_full(world, final.state, n_items)
    val_m = select["val"] or _NO_METRICS
    cold = _cold_counts(world, tr_loc, va_loc, train.n_users, hi - lo)
    t = cfg.train
    summary = {
        "val_rmse": val_m["rmse"], "val_mae": val_m["mae"], "val_mse": val_m["mse"],
        "train_rmse": select["train"]["rmse"], "train_mae": select["train"]["mae"],
        "train_mse": select["train"]["mse"],
        "best_epoch": select["best_epoch"], "epochs_run": select["epochs_run"],
        "stopped_early": select["stopped_early"],
        "train_seconds": select["seconds"] + (refit["seconds"] if refit else 0.0),
        "n_train": n_global(world, tr_loc), "n_val": n_val, **cold,
        "refit": refit,
        "global_mean": refit["global_mean"] if refit else select["global_mean"],
        "n_users": train.n_users, "n_items": n_items, "factors": cfg.model.factors,
        "solver": t.solver, "optimizer": t.optimizer if t.solver == "sgd" else None,
        "kernel": t.kernel, "device": str(world.device), "world_size": world.world_size,
        "torch_threads": torch.get_num_threads(),  # of rank 0: context for train_seconds
        "seed": t.seed, "split_seed": cfg.data.split_seed,
    }
    return FitResult(state=state, summary=summary, history=history)


def _run_phase(phase: str, cfg: Config, world: World, train: Ratings, val: Ratings | None,
               epochs: int, *, n_items: int, lo: int, hi: int, run_dir: Path | None,
               ckpt: TrainingState | None, carry: dict, history: list[dict], quiet: bool,
               log: Callable[[str], None]) -> PhaseResult:
    """Train one phase on the local ratings ``train`` (validation ``val``). ``carry`` is
    phase-independent checkpoint content (the selection result during a refit, config, id
    map); ``history`` is extended with the phase's rows (replaced by a resumed checkpoint's)."""
    dev = world.device
    t = cfg.train
    vdata = DeviceRatings.of(val, dev) if val is not None and n_global(world, val) > 0 else None
    shard = TrainShard.build(world, train, n_items, lo, hi)
    solver = make_solver(cfg, world, shard)
    if t.init_from and not (ckpt is not None and ckpt.phase == phase):
        # a resumed phase has its own rows in the checkpoint; warm-start only fresh ones
        from svdfill.train.warm_start import describe, warm_start

        kept = warm_start(solver.model, t.init_from, carry.get("idmap"), lo, hi)
        if not quiet and world.is_main:
            log(describe(kept, shard.n_users, hi - lo, t.init_from))
    data = shard.ratings
    # each rank's share of the per-epoch train-metrics sample follows its share of the ratings
    n_all = max(shard.n_global, 1.0)
    share = math.ceil(t.metrics_sample * len(data) / n_all) if t.metrics_sample > 0 else 0
    tdata = data.sample(share, phase_seed(t.seed, phase, 0, world.rank))

    start_epoch, best, bad, seconds = 0, None, 0, 0.0
    if ckpt is not None and ckpt.phase == phase:
        solver.load_state(ckpt)
        start_epoch, bad, seconds = ckpt.epoch, ckpt.bad_epochs, ckpt.seconds
        if ckpt.best is not None:
            b = ckpt.best
            best = BestEpoch(b.epoch, b.metrics, slice_state(b.state, lo, hi, dev)
                             if b.state is not None else None)
        del history[:]
        history.extend(ckpt.history)

    progress = (not quiet) and world.is_main and sys.stderr.isatty()
    stopped_early = False
    epoch = start_epoch
    if best is not None and t.patience and bad >= t.patience and vdata is not None:
        stopped_early = True
    while epoch < epochs and not stopped_early:
        epoch += 1
        t0 = time.perf_counter()
        solver.run_epoch(phase, epoch, progress)
        tm = solver.evaluate(tdata)
        vm = solver.evaluate(vdata) if vdata is not None else dict(_NO_METRICS)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        seconds += dt
        row = {"phase": phase, "epoch": epoch, "lr": solver.lr_at(epoch),
               **{f"train_{k}": v for k, v in tm.items()}, **{f"val_{k}": v for k, v in vm.items()},
               **solver.epoch_info(), "seconds": round(dt, 4)}
        history.append(row)
        if not quiet and world.is_main:
            log(_fmt_row(row))
        if run_dir is not None and world.is_main:
            # rewritten whole (atomically) each epoch: after a resume it never holds the
            # epochs that were rolled back to the checkpoint
            ck.save_jsonl(run_dir / ck.METRICS_FILE, history)
        if vdata is None:
            best = BestEpoch(epoch, vm, None)
        elif best is None or vm["rmse"] < best.metrics["rmse"] - t.min_delta:
            best = BestEpoch(epoch, vm, solver.local_state())
            bad = 0
        else:
            bad += 1
            if t.patience and bad >= t.patience:
                stopped_early = True
        ckpt_dir = None
        if run_dir is not None and (epoch % t.checkpoint_every == 0 or epoch == epochs or stopped_early):
            _write_checkpoint(world, run_dir, phase, epoch, solver, best, bad, seconds, history,
                              carry, n_items)
            ckpt_dir = run_dir if world.is_main else None
        world.report_epoch(dict(row), ckpt_dir)

    if vdata is not None and best is not None and best.state is not None:
        solver.model.load_state_tensors(best.state)
    return PhaseResult(state=solver.local_state(), best_epoch=best.epoch if best else epoch,
                       best=best.metrics if best else None, epochs_run=epoch,
                       stopped_early=stopped_early, seconds=seconds,
                       global_mean=shard.global_mean, train_metrics=solver.evaluate(data))


def _write_checkpoint(world: World, run_dir: Path, phase: str, epoch: int, solver: Solver,
                      best: BestEpoch | None, bad: int, seconds: float, history: list[dict],
                      carry: dict, n_items: int) -> None:
    """Gather full tables (every rank) and write ``checkpoint.pt`` (main rank)."""
    state, opt = gather_full(world, solver.local_state(), n_items, solver.optimizer_tables())
    best_out = None
    if best is not None:
        bstate = None
        if best.state is not None:
            bstate, _ = gather_full(world, best.state, n_items)
        best_out = BestEpoch(best.epoch, best.metrics, bstate)
    solver_state = solver.solver_state()  # a collective at W > 1: before the other ranks return
    if not world.is_main:
        return
    ck.save_training_state(run_dir, TrainingState(
        phase=phase, epoch=epoch, model=state, optimizer=opt, solver=solver_state,
        best=best_out, bad_epochs=bad, seconds=seconds, history=history,
        rng={"scheme": "per-epoch generator seeded by (seed, phase, epoch, rank)",
             "seed": solver.cfg.train.seed, "next_epoch": epoch + 1},
        world_size=world.world_size, extra=carry))
    ck.save_jsonl(run_dir / ck.METRICS_FILE, history)


def _cold_counts(world: World, train: Ratings, val: Ratings | None, n_users: int,
                 n_items_local: int) -> dict[str, int]:
    """Validation ratings whose user, item, or either has no training rating (all ranks)."""
    dev = world.device
    if val is None:
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
    else:
        uc, ic = rating_counts(world, train, n_users, n_items_local, dev)
        cu = uc[val.users.to(dev, torch.int64)] == 0
        ci = ic[val.items.to(dev, torch.int64)] == 0
        sums = torch.stack([(cu | ci).sum(), cu.sum(), ci.sum()]).to(torch.float64)
    world.all_reduce_sum(sums)
    a, b, c = (int(x) for x in sums.cpu())
    return {"n_val_cold": a, "n_val_cold_users": b, "n_val_cold_items": c}


def _fmt_row(row: dict) -> str:
    """One epoch's log line."""
    def part(prefix: str, label: str) -> str:
        if row.get(f"{prefix}_mse") is None or (isinstance(row.get(f"{prefix}_mse"), float)
                                                 and math.isnan(row[f"{prefix}_mse"])):
            return ""
        return (f"  {label} MSE {row[f'{prefix}_mse']:.4f} RMSE {row[f'{prefix}_rmse']:.4f} "
                f"MAE {row[f'{prefix}_mae']:.4f}")
    head = ("refit epoch" if row["phase"] == "refit" else "epoch") + f" {row['epoch']}"
    chain = (f"  σ {row['noise_sigma']:.3f}, {row['samples']} averaged" if "samples" in row else "")
    return f"{head}{part('train', 'train')}{part('val', 'val')}{chain}  ({row['seconds']:.1f} s)"
