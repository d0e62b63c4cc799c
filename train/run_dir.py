"""Run-directory preparation: what to do with ``--out`` before any work (fresh, resume,
done, or refuse), and which config differences make a different run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from svdfill import checkpoint as ck
from svdfill.config import Config, to_dict

IGNORED_FOR_IDENTITY = {("train", "epochs"), ("train", "device"), ("train", "checkpoint_every"),
                        ("name",)}
"""Config keys that do not change the trained model (more epochs continue the same run)."""
IGNORED_SECTIONS = {"fill", "dist"}
"""Config sections that do not change the trained model."""


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    """Dotted keys where two config dicts differ in what changes the trained model
    (ignores ``train.epochs``, ``train.device``, ``train.checkpoint_every``, ``name``,
    ``fill.*``, ``dist.*``; NaN equals NaN)."""
    fa, fb = _flat(a), _flat(b)
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        if key in IGNORED_FOR_IDENTITY or key[0] in IGNORED_SECTIONS:
            continue
        x, y = fa.get(key), fb.get(key)
        same = (x == y) or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if not same:
            diffs.append(".".join(key))
    return diffs


def _stored_config(path: Path) -> dict | None:
    """The config a run directory's ``config.toml`` records (keys of earlier versions mapped
    to where they live now, so an older run of the same settings is the same run); None
    when it cannot be read."""
    from svdfill.config import ConfigError, load_config

    try:
        return to_dict(load_config(path, upgrade=True))
    except ConfigError:
        return None


def prepare_run_dir(run_dir: str | os.PathLike, cfg: Config, *, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``run_dir`` before any work; creates nothing.

    Returns ``"fresh"`` (start a new run; with ``overwrite`` the old run's files were
    removed), ``"resume"`` (continue this run from its checkpoint) or ``"done"`` (this run
    already finished and ``resume`` was asked). Raises :class:`FileExistsError` when the
    folder holds a different run (or this one, without ``--resume``) and ``overwrite`` is off.
    """
    d = Path(run_dir)
    if resume and overwrite:
        from svdfill.errors import UserError

        raise UserError("--resume and --overwrite contradict each other: pick one")
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d}: exists and is not a directory")
    ours = [f for f in ck.RUN_FILES if (d / f).exists()]
    others = [p.name for p in d.iterdir() if p.name not in ck.RUN_FILES and not p.name.startswith(".")] \
        if d.is_dir() else []
    if overwrite:
        for f in ours:
            (d / f).unlink()
        for p in d.glob(".*.tmp") if d.is_dir() else []:
            p.unlink(missing_ok=True)
        return "fresh"
    if not ours:
        if others:
            raise FileExistsError(f"{d}: folder is not empty and holds no svdfill run "
                                  f"({', '.join(sorted(others)[:5])}…); pick another --out or pass --overwrite")
        return "fresh"
    old = _stored_config(d / ck.CONFIG_FILE) if (d / ck.CONFIG_FILE).exists() else None
    diffs = config_differences(old, to_dict(cfg)) if old is not None else ["(unreadable config.toml)"]
    if diffs:
        raise FileExistsError(f"{d}: holds a different run (differs in {', '.join(diffs[:8])}); "
                              "pass --overwrite to replace it or pick another --out")
    if not resume:
        raise FileExistsError(f"{d}: already holds this run; pass --resume to continue it or "
                              "--overwrite to start again")
    if (d / ck.SUMMARY_FILE).exists() and (d / ck.MODEL_FILE).exists():
        return "done"
    return "resume" if (d / ck.CHECKPOINT_FILE).exists() else "fresh"
