"""The whole training job on the grid layout (``[dist] layout = "grid"``): data → blocks →
:func:`~svdfill.train.grid_loop.fit_grid` → run directory.

Reading: in a torch.distributed world each rank reads its share of the dataset
(:func:`svdfill.distributed.ingest.read_sharded`, which also splits it and sends each
rating to the rank of its item block); the user blocks are then cut from the all-reduced
per-user training counts and one all-to-all gives every rank its ``by_user`` ratings
(:func:`~svdfill.distributed.grid.route_ratings`); per-user and time splits and
deduplication are drawn on the user's rank by ``read_sharded`` too. Where per-rank reading
does not apply (one process, synthetic data, data handed in) every rank loads and splits the
whole dataset and keeps its blocks' rows (said once).

The run directory holds ``config.toml``, ``metrics.jsonl``, ``summary.json``,
``grid_checkpoint/`` while training and ``grid_model/`` (per-rank blocks, seen sets, the
id map and ``layout.json``) instead of ``model.pt``/``seen.pt``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from svdfill import checkpoint as ck
from svdfill.config import Config
from svdfill.distributed.grid import (GridLayout, GridShard, grid_bounds, route,
                                     route_ratings_counted)
from svdfill.train.grid_loop import CHECKPOINT_DIR, MODEL_DIR, fit_grid, save_grid_run_model
from svdfill.train.run_dir import prepare_run_dir


def grid_action(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> str:
    """:func:`prepare_run_dir` for a grid run: its checkpoint and model are folders."""
    if overwrite and run_dir.is_dir():
        for sub in (CHECKPOINT_DIR, MODEL_DIR):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    action = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    if resume and action == "fresh":
        if (run_dir / ck.SUMMARY_FILE).exists() and (run_dir / MODEL_DIR / "layout.json").exists():
            return "done"
        if (run_dir / CHECKPOINT_DIR / "layout.json").exists():
            return "resume"
    return action


def run_grid_training(cfg: Config, run_dir, *, world, resume: bool = False,
                      overwrite: bool = False, quiet: bool = False,
                      log: Callable[[str], None] = print, data: tuple[Any, Any] | None = None) -> dict:
    """:func:`svdfill.train.run.run_training` on the grid layout; returns the summary."""
    run_dir = Path(run_dir)
    action = world.broadcast_object(grid_action(run_dir, cfg, resume=resume, overwrite=overwrite)
                                    if world.is_main else None)
    if action == "done":
        if world.is_main and not quiet:
            log(f"{run_dir}: run already complete (summary.json); nothing to resume")
        return json.loads((run_dir / ck.SUMMARY_FILE).read_text())
    t0 = time.perf_counter()
    shard, idmap, ingest = grid_shard(cfg, world, data, quiet, log)
    created = not run_dir.exists()
    try:
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ck.save_config_echo(run_dir, cfg)
        world.barrier()
        t = cfg.train
        if world.is_main and not quiet:
            log(f"grid layout: {world.world_size} rank(s); rank 0 holds users "
                f"{shard.user_block}, items {shard.item_block}; {t.solver}, "
                f"d={cfg.model.factors}, device {world.device}")
        t_fit = time.perf_counter()
        solver, summary, history = fit_grid(cfg, world, shard, run_dir,
                                            resume=action == "resume", quiet=quiet, log=log)
        summary["ingest"] = ingest
        summary["split"] = cfg.data.split
        # after a refit the solver's shard holds train ∪ val: its seen sets are every rated pair
        save_grid_run_model(world, run_dir, solver.shard, solver, idmap, cfg, summary)
        if world.is_main:
            ck.save_jsonl(run_dir / ck.METRICS_FILE, history)
            ck.save_json(run_dir / ck.SUMMARY_FILE, summary)
            try:
                from svdfill.train.plot import write_learning_curve

                write_learning_curve(run_dir)
            except ImportError:
                pass
            if not quiet:
                log(f"wall time: data {t_fit - t0:.1f} s, training {time.perf_counter() - t_fit:.1f} s")
        world.barrier()
    except BaseException:
        if world.is_main and created and not (run_dir / CHECKPOINT_DIR).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return summary


def grid_shard(cfg: Config, world, data, quiet: bool, log) -> tuple[GridShard, Any, str]:
    """This rank's :class:`GridShard`, the world's id map, and how the data was read."""
    W, rank = world.world_size, world.rank
    if data is None and hasattr(world, "with_shards"):  # a torch.distributed rank
        from svdfill.distributed import ingest

        why = ingest.supported(cfg.data)
        if why is None:
            got = ingest.read_sharded(cfg.data, world, log=None if quiet else log)
            tr, va, idmap = got.train, got.val, got.idmap
            counts = torch.bincount(tr.users.long(), minlength=idmap.n_users).to(torch.float64)
            world.all_reduce_sum(counts)
            layout = GridLayout(idmap.n_users, idmap.n_items,
                                grid_bounds(idmap.n_users, W, counts.long()), got.shards)
            del counts
            by_user, by_item, sent = route_ratings_counted(world, layout, tr.users, tr.items,
                                                           tr.ratings)
            del tr
            vu = va.users.long()
            val_cols, sent_v = route(world, layout.user_owner(vu),
                                     [vu, va.items.long(), va.ratings.float()])
            return (GridShard(layout, rank, W, by_user, by_item, tuple(val_cols),
                              bytes_routed=sent + sent_v), idmap, "each rank its share")
        if world.is_main and not quiet:
            log(f"every rank reads all the ratings ({why})")
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.errors import UserError
    from svdfill.train.run import _cutoff

    ratings, idmap = data if data is not None else load_dataset(cfg.data)
    if len(ratings) == 0:
        raise UserError(f"{cfg.data.path or 'synthetic data'}: no ratings to train on")
    tr, va = split(ratings, how=cfg.data.split, fraction=cfg.data.val_fraction,
                   seed=cfg.data.split_seed, cutoff=_cutoff(cfg))
    del ratings
    layout = GridLayout(tr.n_users, tr.n_items,
                        grid_bounds(tr.n_users, W, torch.bincount(tr.users.long(), minlength=tr.n_users)),
                        grid_bounds(tr.n_items, W, torch.bincount(tr.items.long(), minlength=tr.n_items)))
    u, i, r = tr.users.long(), tr.items.long(), tr.ratings.float()
    mine_u = layout.user_owner(u) == rank
    mine_i = layout.item_owner(i) == rank
    vu, vi, vr = va.users.long(), va.items.long(), va.ratings.float()
    mine_v = layout.user_owner(vu) == rank
    shard = GridShard(layout, rank, W, (u[mine_u], i[mine_u], r[mine_u]),
                      (u[mine_i], i[mine_i], r[mine_i]), (vu[mine_v], vi[mine_v], vr[mine_v]))
    return shard, idmap, "every rank all" if W > 1 else "one process"
