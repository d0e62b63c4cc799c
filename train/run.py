"""The whole training job: data → split → :func:`~svdfill.train.loop.fit` → run directory."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from svdfill import checkpoint as ck
from svdfill.config import Config
from svdfill.data.dataset import Ratings
from svdfill.distributed.world import World
from svdfill.train.loop import fit
from svdfill.train.run_dir import prepare_run_dir


def run_training(cfg: Config, run_dir: str | os.PathLike, *, world: World | None = None,
                 reshard: Callable[[World, Ratings], World] | None = None,
                 resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 log: Callable[[str], None] = print, data: tuple[Ratings, Any] | None = None) -> dict:
    """Load ``cfg.data``, split it, :func:`fit`, and write the run directory; returns the
    summary dict.

    world: this process's World; ``None`` = one process on ``cfg.train.device``.
    reshard: ``reshard(world, train) -> World`` called after the split, e.g. to give every
    rank its item shard from the training ratings' per-item counts
    (:func:`svdfill.distributed.sharding.shard_by_rating_counts`).
    data: ``(ratings, idmap)`` already loaded (skips reading ``cfg.data``).
    ``cfg.dist.layout = "grid"``: :func:`svdfill.train.grid_run.run_grid_training` instead
    (``reshard`` unused; the run directory holds ``grid_model/`` instead of ``model.pt``).
    Writes (main rank): ``config.toml`` first, then checkpoints and ``metrics.jsonl`` while
    training, then ``seen.pt``, ``model.pt`` and last ``summary.json``. On failure the
    final outputs of this attempt are removed; the checkpoint stays for ``--resume``, and
    a run that never reached a checkpoint leaves nothing behind.
    """
    from svdfill.data.csr import build_csr, build_csr_pair
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import describe, split

    run_dir = Path(run_dir)
    w0 = world if world is not None else World(device=torch.device(cfg.train.device))
    if cfg.dist.layout == "grid":  # blocks of users and items per rank: its own job
        from svdfill.train.grid_run import run_grid_training

        return run_grid_training(cfg, run_dir, world=w0, resume=resume, overwrite=overwrite,
                                 quiet=quiet, log=log, data=data)
    action = w0.broadcast_object(prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
                                 if w0.is_main else None)
    if action == "done":
        if w0.is_main and not quiet:
            log(f"{run_dir}: run already complete (summary.json); nothing to resume")
        import json
        return json.loads((run_dir / ck.SUMMARY_FILE).read_text())

    t_start = time.perf_counter()
    shared = _read_shares(cfg, w0, data, quiet, log)
    if shared is not None:  # each rank read its share; its item shard's ratings came to it
        train, val, idmap = shared.train, shared.val, shared.idmap
        w = w0.with_shards(shared.shards)
        ingest = "each rank its share"
    else:
        ratings, idmap = data if data is not None else load_dataset(cfg.data)
        if len(ratings) == 0:
            from svdfill.errors import UserError

            raise UserError(f"{cfg.data.path or 'synthetic data'}: no ratings to train on")
        train, val = split(ratings, how=cfg.data.split, fraction=cfg.data.val_fraction,
                           seed=cfg.data.split_seed, cutoff=_cutoff(cfg))
        w = reshard(w0, train) if reshard is not None else w0
        ingest = "every rank all" if w.world_size > 1 else "one process"
    counts = torch.tensor([float(len(train)), float(len(val))], dtype=torch.float64)
    if shared is not None:
        w.all_reduce_sum(counts)
    n_train, n_val = (int(x) for x in counts)
    how_split = describe(cfg.data.split, cfg.data.val_fraction, _cutoff(cfg))

    created_dir = not run_dir.exists()
    wrote_final: list[Path] = []
    try:
        if w.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ck.save_config_echo(run_dir, cfg)
        w.barrier()
        if w.is_main and not quiet:
            t = cfg.train
            method = t.solver if t.solver != "sgd" else "sgd/" + t.optimizer
            log(f"training on {n_train:,} ratings ({train.n_users:,} users × {train.n_items:,} items), "
                f"validating on {n_val:,} ({how_split}); {method}, d={cfg.model.factors}, "
                f"device {w.device}" + (f", world {w.world_size}" if w.world_size > 1 else ""))
        t_fit = time.perf_counter()
        res = fit(cfg, train, val, w, run_dir, resume=action == "resume", quiet=quiet, log=log,
                  extra_checkpoint={"idmap": idmap.to_state()})
        t_write = time.perf_counter()
        res.summary["ingest"] = ingest
        res.summary["split"] = how_split
        if shared is not None:  # a collective: the ranks' shard seen sets joined on the main one
            from svdfill.distributed.ingest import gather_seen

            seen = gather_seen(w, train, val)
        if w.is_main:
            wrote_final.append(run_dir / ck.SEEN_FILE)
            if shared is not None:
                seen_train, seen_all = seen
                if res.summary["refit"]:
                    seen_train = seen_all
            elif res.summary["refit"]:  # trained on train ∪ val = every rated pair: one CSR
                seen_all = build_csr(ratings.users, ratings.items, ratings.n_users, device=w.device)
                seen_train = seen_all
            else:  # train and train ∪ val from one sort (split partitions the ratings)
                seen_train, seen_all = build_csr_pair(train.users, train.items, val.users, val.items,
                                                      ratings.n_users, device=w.device)
            ck.save_seen(run_dir, seen_train, seen_all)
            wrote_final.append(run_dir / ck.MODEL_FILE)
            ck.save_model(run_dir, res.state, idmap, cfg, res.summary)
            ck.save_jsonl(run_dir / ck.METRICS_FILE, res.history)
            wrote_final.append(run_dir / ck.SUMMARY_FILE)
            ck.save_json(run_dir / ck.SUMMARY_FILE, res.summary)
            try:
                from svdfill.train.plot import write_learning_curve

                write_learning_curve(run_dir)
            except ImportError:
                pass
            if not quiet:
                log(f"wall time: data {t_fit - t_start:.1f} s (load, split), training "
                    f"{t_write - t_fit:.1f} s, writing the run {time.perf_counter() - t_write:.1f} s")
        w.barrier()
    except BaseException:
        if w.is_main:
            for p in wrote_final:
                p.unlink(missing_ok=True)
            if not (run_dir / ck.CHECKPOINT_FILE).exists():
                for f in ck.RUN_FILES:
                    (run_dir / f).unlink(missing_ok=True)
                if created_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
                    shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return res.summary


def _read_shares(cfg: Config, world: World, data, quiet: bool, log: Callable[[str], None]):
    """In a world of ranks that shard items (``with_shards``), each rank's share of the
    dataset routed to its item shard (:mod:`svdfill.distributed.ingest`); None where every
    rank reads all of it (one process, data given, or settings ingest cannot share yet,
    said once)."""
    if data is not None or world.world_size == 1 or not hasattr(world, "with_shards"):
        return None
    from svdfill.distributed import ingest

    why = ingest.supported(cfg.data)
    if why is not None:
        if world.is_main and not quiet:
            log(f"every rank reads all the ratings ({why})")
        return None
    return ingest.read_sharded(cfg.data, world, log=None if quiet else log)


def _cutoff(cfg: Config) -> int | None:
    """Unix seconds of ``data.split_time`` (the time split's global cut-off), or None."""
    from svdfill.config import parse_split_time

    return parse_split_time(cfg.data.split_time) if cfg.data.split_time != "" else None
