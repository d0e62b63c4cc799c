"""The epoch loop on the grid layout: the phases of :func:`svdfill.train.loop.fit`
(selection: early stopping on validation RMSE, the best epoch's blocks kept; with
``train.refit`` a fresh solver on train ∪ validation for the best epoch count) over a grid
solver, with grid checkpoints (:mod:`svdfill.distributed.grid_checkpoint`) instead of full
tables.

Checkpoints live in ``run_dir/grid_checkpoint/``: every rank writes its blocks of the
current state (``state-eNNNNNN``; ``refit-state-eNNNNNN`` in the refit) and of the best
epoch (``best-eNNNNNN``); rank 0 then
writes ``layout.json`` naming them with the training record (epoch, history, best metrics,
patience counter, seconds) and removes the files of older checkpoints. A file set is only
used once ``layout.json`` names it, so a kill mid-write resumes from the previous one.
``--resume`` at another W re-blocks on load.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from svdfill import checkpoint as ck
from svdfill.config import Config
from svdfill.distributed import grid_checkpoint as gck
from svdfill.distributed.grid import GridShard

CHECKPOINT_DIR = "grid_checkpoint"
MODEL_DIR = "grid_model"
_NO_METRICS = {"mse": math.nan, "rmse": math.nan, "mae": math.nan}


def make_grid_solver(cfg: Config, world, shard: GridShard):
    """The grid solver of ``cfg.train.solver``: ALS, Gibbs, or DSGD
    (:class:`svdfill.train.dsgd.DSGDSolver`, optimizer ``sgd`` or ``adagrad``: it raises
    UserError for the others)."""
    s = cfg.train.solver
    if s == "als":
        from svdfill.train.grid_als import GridALSSolver

        return GridALSSolver(cfg, world, shard)
    if s == "gibbs":
        from svdfill.train.grid_gibbs import GridGibbsSolver

        return GridGibbsSolver(cfg, world, shard)
    if s == "sgd":  # DSGD (item blocks around a ring); it names the optimizers it runs
        from svdfill.train.dsgd import DSGDSolver

        return DSGDSolver(cfg, world, shard)
    from svdfill.errors import UserError

    raise UserError(f"grid layout with solver {s!r} is not supported")


def fit_grid(cfg: Config, world, shard: GridShard, run_dir: Path | None, *, resume: bool,
             quiet: bool, log: Callable[[str], None]) -> tuple[object, dict, list[dict]]:
    """Train on the grid; returns ``(solver holding the kept blocks, summary, history)``.

    Selection phase: up to ``train.epochs`` epochs, early stopping on validation RMSE, the
    best epoch's blocks kept. With ``train.refit`` (and validation ratings) a second phase
    trains a fresh solver on train ∪ validation (:func:`refit_shard`: the validation
    ratings join their user's block and are routed to their item's) for the best epoch
    count; its blocks are the result and ``solver.shard`` is that merged shard (so the saved
    seen sets are every rated pair, as the one-table refit's). A run killed in either phase
    resumes in it (the refit's checkpoint carries the selection's result)."""
    t = cfg.train
    layout = shard.layout
    ckdir = run_dir / CHECKPOINT_DIR if run_dir is not None else None
    rec = None
    if resume and ckdir is not None:
        rec = world.broadcast_object(_read_ckpt(ckdir) if world.is_main else None)
        if rec is not None:
            old = rec["layout"]
            if (old.n_users, old.n_items) != (layout.n_users, layout.n_items):
                raise ck.CheckpointError(f"{ckdir}: checkpoint has {old.n_users} users × "
                                         f"{old.n_items} items, the data {layout.n_users} × "
                                         f"{layout.n_items}")
            if not quiet and world.is_main:
                tr = rec["training"]
                what = "refit epoch" if tr.get("phase") == "refit" else "epoch"
                log(f"resuming at {what} {int(tr['epoch']) + 1} from {ckdir} (saved at W = "
                    f"{old.world_size}, now {layout.world_size})")
    resumed_refit = rec is not None and rec["training"].get("phase") == "refit"
    history: list[dict] = []

    if resumed_refit:
        select = dict(rec["training"]["select"])
        solver = None
    else:
        solver = make_grid_solver(cfg, world, shard)
        sel = _run_phase("select", cfg, world, shard, solver, t.epochs, ckdir, rec, history,
                         {}, quiet, log)
        trm = solver.evaluate("train")
        select = {"best_epoch": sel["best_epoch"], "epochs_run": sel["epoch"],
                  "stopped_early": sel["stopped"], "seconds": sel["seconds"],
                  "val": sel["best_metrics"], "train": trm, "global_mean": solver.global_mean,
                  "n_train": int(solver.n_global), "n_val": int(solver.n_val),
                  "sweep_sent": solver._last_sweep[0], "sweep_received": solver._last_sweep[1]}

    refit = None
    if t.refit and select["n_val"] > 0:
        solver = None  # the selected blocks are not needed any more: free them first
        rshard = refit_shard(world, shard)
        solver = make_grid_solver(cfg, world, rshard)
        ref = _run_phase("refit", cfg, world, rshard, solver, int(select["best_epoch"]), ckdir,
                         rec if resumed_refit else None, history, {"select": select}, quiet, log)
        rtm = solver.evaluate("train")
        refit = {"epochs": ref["epoch"], "n_train": int(solver.n_global),
                 "seconds": ref["seconds"], "global_mean": solver.global_mean,
                 **{f"train_{k}": v for k, v in rtm.items()}}
    elif solver is None:
        raise ck.CheckpointError(f"{ckdir}: the checkpoint is of a refit, the config has "
                                 "train.refit = false (or no validation ratings)")

    val_m = select["val"] or _NO_METRICS
    trm = select["train"]
    last = solver._last_sweep
    summary = {
        "val_rmse": val_m["rmse"], "val_mae": val_m["mae"], "val_mse": val_m["mse"],
        "train_rmse": trm["rmse"], "train_mae": trm["mae"], "train_mse": trm["mse"],
        "best_epoch": select["best_epoch"], "epochs_run": select["epochs_run"],
        "stopped_early": select["stopped_early"],
        "train_seconds": select["seconds"] + (refit["seconds"] if refit else 0.0),
        "n_train": select["n_train"], "n_val": select["n_val"], "refit": refit,
        "global_mean": refit["global_mean"] if refit else select["global_mean"],
        "n_users": layout.n_users, "n_items": layout.n_items,
        "factors": cfg.model.factors, "solver": t.solver,
        "optimizer": t.optimizer if t.solver == "sgd" else None, "kernel": t.kernel,
        "device": str(world.device), "world_size": world.world_size, "layout": "grid",
        "torch_threads": torch.get_num_threads(), "seed": t.seed,
        "split_seed": cfg.data.split_seed,
        "route_bytes_sent_rank0": solver.shard.bytes_routed,
        "sweep_bytes_sent_rank0": last[0] if refit else select["sweep_sent"],
        "sweep_bytes_received_rank0": last[1] if refit else select["sweep_received"],
        **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("sweep_bytes")},
    }
    return solver, summary, history


def refit_shard(world, shard: GridShard) -> GridShard:
    """``shard`` with its validation ratings trained on: they join ``by_user`` (they are
    already on their user's rank, after the training ratings, as the one-table refit's
    train ∪ val) and are routed to their item's rank for ``by_item`` (one all-to-all per
    column; its bytes join ``bytes_routed``). Same layout, no validation. Collective."""
    from svdfill.distributed.grid import route

    vu, vi, vr = shard.val_by_user
    got, sent = route(world, shard.layout.item_owner(vi), [vu, vi, vr])
    cat = lambda a, b: tuple(torch.cat([x, y.to(x.device, x.dtype)]) for x, y in zip(a, b))  # noqa: E731
    empty = tuple(x[:0] for x in shard.val_by_user)
    return GridShard(shard.layout, shard.rank, shard.size, cat(shard.by_user, shard.val_by_user),
                     cat(shard.by_item, got), empty, bytes_routed=shard.bytes_routed + sent)


def _run_phase(phase: str, cfg: Config, world, shard: GridShard, solver, epochs: int,
               ckdir: Path | None, rec: dict | None, history: list[dict], carry: dict,
               quiet: bool, log: Callable[[str], None]) -> dict:
    """Run one phase's epochs on ``solver`` (resumed from ``rec`` when it is of this phase),
    appending rows to ``history``; the best epoch's blocks are loaded at the end. Returns
    ``{"epoch", "stopped", "seconds", "best_epoch", "best_metrics"}``. ``carry``: more
    entries of the checkpoint's training record (a refit's ``select``)."""
    t = cfg.train
    layout, rank = shard.layout, shard.rank
    start, bad, seconds = 0, 0, 0.0
    best_epoch, best_metrics, best_state = None, None, None
    if rec is not None and rec["training"].get("phase", "select") == phase:
        tr = rec["training"]
        solver.load_blocks(_load(ckdir, tr["state"], layout, rank, world))
        if tr.get("best"):
            best_state = _load(ckdir, tr["best"], layout, rank, world)
        start, bad, seconds = int(tr["epoch"]), int(tr["bad_epochs"]), float(tr["seconds"])
        best_epoch, best_metrics = tr.get("best_epoch"), tr.get("best_metrics")
        history[:] = list(tr["history"])

    has_val = solver.n_val > 0
    epoch, stopped = start, False
    if best_epoch is not None and t.patience and bad >= t.patience and has_val:
        stopped = True
    while epoch < epochs and not stopped:
        epoch += 1
        t0 = time.perf_counter()
        solver.run_epoch(phase, epoch, False)
        tm = solver.evaluate("train_sample")
        vm = solver.evaluate("val") if has_val else dict(_NO_METRICS)
        info = solver.epoch_info()
        dt = time.perf_counter() - t0
        seconds += dt
        row = {"phase": phase, "epoch": epoch, "lr": solver.lr_at(epoch),
               **{f"train_{k}": v for k, v in tm.items()}, **{f"val_{k}": v for k, v in vm.items()},
               **info, "seconds": round(dt, 4)}
        history.append(row)
        if not quiet and world.is_main:
            from svdfill.train.loop import _fmt_row

            log(_fmt_row(row) + f"  [{info['sweep_bytes_sent_max']:,} B sent/rank max]")
        if ckdir is not None and world.is_main:
            ck.save_jsonl(ckdir.parent / ck.METRICS_FILE, history)
        if not has_val:
            best_epoch, best_metrics, best_state = epoch, vm, None
        elif best_metrics is None or vm["rmse"] < best_metrics["rmse"] - t.min_delta:
            best_epoch, best_metrics, best_state, bad = epoch, vm, solver.local_state(), 0
        else:
            bad += 1
            if t.patience and bad >= t.patience:
                stopped = True
        ckpt_dir = None
        if ckdir is not None and (epoch % t.checkpoint_every == 0 or epoch == epochs or stopped):
            _write_ckpt(world, ckdir, shard, solver, phase, epoch, bad, seconds, history,
                        best_epoch, best_metrics, best_state, carry)
            ckpt_dir = ckdir if world.is_main else None
        world.report_epoch(dict(row), ckpt_dir)

    if has_val and best_state is not None:
        solver.load_blocks(best_state)
    return {"epoch": epoch, "stopped": stopped, "seconds": seconds,
            "best_epoch": best_epoch if best_epoch is not None else epoch,
            "best_metrics": best_metrics if has_val else None}


def _load(ckdir: Path, name: str, layout, rank: int, world) -> dict[str, torch.Tensor]:
    """This rank's blocks of checkpoint ``name`` under ``layout`` (re-blocked), with the
    replicated entries (a chain's scalars), on the device."""
    st = {**gck.load_grid_block(ckdir, name, layout, rank), **gck.load_grid_extra(ckdir, name)}
    return {k: v.to(world.device) for k, v in st.items()}


def _read_ckpt(ckdir: Path) -> dict | None:
    if not (ckdir / gck.LAYOUT_FILE).is_file():
        return None
    rec = gck.read_layout(ckdir)
    if "training" not in rec:
        raise ck.CheckpointError(f"{ckdir / gck.LAYOUT_FILE}: no training record")
    return rec


def _write_ckpt(world, ckdir: Path, shard: GridShard, solver, phase: str, epoch: int, bad: int,
                seconds: float, history: list[dict], best_epoch, best_metrics, best_state,
                carry: dict) -> None:
    """Every rank writes its blocks; rank 0 then names them in ``layout.json`` (collective)."""
    layout, rank = shard.layout, shard.rank
    # a refit's files get their own names: its first epochs must not overwrite the
    # selection's files that layout.json still names until the refit's first checkpoint
    pre = "" if phase == "select" else f"{phase}-"
    name = f"{pre}state-e{epoch:06d}"
    gck.save_grid_model(ckdir, name, layout, rank, solver.local_state())
    best = None
    if best_state is not None:
        if int(best_epoch) == epoch:  # the best epoch is this one: its blocks are the state's
            best = name
        else:
            best = f"{pre}best-e{int(best_epoch):06d}"
            gck.save_grid_model(ckdir, best, layout, rank, best_state)
    world.barrier()
    if world.is_main:
        training = {"phase": phase, "epoch": epoch, "bad_epochs": bad, "seconds": seconds,
                    "history": history, "state": name, "best": best, "best_epoch": best_epoch,
                    "best_metrics": best_metrics, **carry}
        gck.write_layout(ckdir, layout, {"factors": solver.d, "global_mean": solver.global_mean,
                                         "n_users": layout.n_users, "n_items": layout.n_items,
                                         "training": ck._json_safe(training)},
                         names=[n for n in (name, best) if n])
        gck.remove_names(ckdir, {n for n in (name, best) if n})
    world.barrier()


def save_grid_run_model(world, run_dir: Path, shard: GridShard, solver, idmap, cfg: Config,
                        summary: dict) -> Path:
    """Write ``run_dir/grid_model/``: every rank's blocks and seen sets, then (rank 0) the
    id map and ``layout.json`` with the model meta (collective)."""
    from svdfill.config import to_dict
    from svdfill.data.csr import build_csr_pair

    layout, rank = shard.layout, shard.rank
    mdir = run_dir / MODEL_DIR
    gck.save_grid_model(mdir, "model", layout, rank,
                        {k: v for k, v in solver.local_state().items() if k in gck.MODEL_KEYS})
    # the user block's seen items (train, train ∪ val): what the grid fill excludes per user
    u_lo, u_hi = shard.user_block
    bu, bv = shard.by_user, shard.val_by_user
    (tp, ti), (ap, ai) = build_csr_pair(bu[0] - u_lo, bu[1], bv[0] - u_lo, bv[1], u_hi - u_lo,
                                        n_items=layout.n_items)
    ck.atomic_torch_save(mdir / gck.rank_file("seen", rank, layout.world_size),
                         {"user_lo": torch.tensor(u_lo), "train_indptr": tp, "train_indices": ti,
                          "all_indptr": ap, "all_indices": ai})
    world.barrier()
    if world.is_main:
        ck.atomic_torch_save(mdir / "idmap.pt", idmap.to_state())
        gck.write_layout(mdir, layout, {"factors": solver.d, "global_mean": solver.global_mean,
                                        "n_users": layout.n_users, "n_items": layout.n_items,
                                        "config": to_dict(cfg), "metrics": ck._json_safe(summary),
                                        "seen": "seen", "idmap": "idmap.pt"},
                         names=["model"])
    world.barrier()
    return mdir

