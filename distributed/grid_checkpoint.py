"""Grid models and checkpoints on disk: one file per rank plus a layout record.

A folder holds ``layout.json`` (the :class:`~svdfill.distributed.grid.GridLayout` record,
W, the model's meta — d, global_mean, n_users, n_items — and what else the writer adds, e.g.
a training state) and, for every saved ``name``, one file per rank
``<name>.rank-RRRRR-of-WWWWW.pt`` holding that rank's ``user_factors [u_hi-u_lo, d]``,
``user_bias``, ``item_factors [i_hi-i_lo, d]``, ``item_bias`` and the int64 scalars
``user_lo``, ``item_lo``, and whatever else its writer keeps: more tables of block rows
named ``user_*`` / ``item_*`` (any dtype; re-blocked like the model's), and replicated
entries under other names (the same on every rank, e.g. a sampler's scalars; read from
rank 0's file by :func:`load_grid_extra`). No file holds a full table, and none is ever assembled:
:func:`load_grid_rows` reads any row range from the files that overlap it (memory-mapped),
so a run at another W re-blocks on load.

Every file is written under a temporary name and renamed; ``layout.json`` is written last
(by rank 0, after every rank's files are in place), so a reader that finds it finds the
files it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from svdfill.checkpoint import CheckpointError, atomic_torch_save, atomic_write_text
from svdfill.distributed.grid import GridLayout

LAYOUT_FILE = "layout.json"
GRID_FORMAT = "svdfill-grid-model/1"
TABLE_KEYS = {"user": ("user_factors", "user_bias"), "item": ("item_factors", "item_bias")}
MODEL_KEYS = TABLE_KEYS["user"] + TABLE_KEYS["item"]


def rank_file(name: str, rank: int, world_size: int) -> str:
    """``<name>.rank-RRRRR-of-WWWWW.pt``."""
    return f"{name}.rank-{rank:05d}-of-{world_size:05d}.pt"


def save_grid_model(dir: str | os.PathLike, name: str, layout: GridLayout, rank: int,
                    tensors: dict[str, torch.Tensor], *, world=None, meta: dict | None = None
                    ) -> Path:
    """Write rank ``rank``'s blocks of ``name`` into ``dir`` (atomically).

    tensors: ``user_factors [u_hi-u_lo, d]``, ``user_bias``, ``item_factors [i_hi-i_lo, d]``,
    ``item_bias`` of the rank's blocks (any device; saved on CPU, contiguous).
    world, meta: given, the call is a collective: after every rank's file is written, rank 0
    writes ``layout.json`` with ``meta`` (merged into the record) and ``name`` listed.
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    (u_lo, u_hi), (i_lo, i_hi) = layout.user_bounds[rank], layout.item_bounds[rank]
    obj = {}
    missing = [k for k in MODEL_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"save_grid_model: tensors lack {missing}")
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if key in MODEL_KEYS:
            t = t.to(torch.float32)
        side = key.split("_", 1)[0]
        if side in TABLE_KEYS:  # rows of this rank's block
            rows = (u_hi - u_lo) if side == "user" else (i_hi - i_lo)
            if t.dim() == 0 or t.shape[0] != rows:
                raise ValueError(f"save_grid_model: {key} has {tuple(t.shape)[:1]} rows, rank "
                                 f"{rank}'s {side} block has {rows}")
        obj[key] = t
    obj["user_lo"] = torch.tensor(u_lo, dtype=torch.int64)
    obj["item_lo"] = torch.tensor(i_lo, dtype=torch.int64)
    path = atomic_torch_save(d / rank_file(name, rank, layout.world_size), obj)
    if world is not None:
        world.barrier()
        if rank == 0:
            write_layout(d, layout, meta or {}, names=[name])
        world.barrier()
    return path


def write_layout(dir: str | os.PathLike, layout: GridLayout, meta: dict, *,
                 names: list[str]) -> Path:
    """Write ``dir/layout.json`` (atomically): the layout record, W, ``names`` and ``meta``."""
    rec = {"format": GRID_FORMAT, "layout": layout.to_record(), "world_size": layout.world_size,
           "names": list(names), **meta}
    return atomic_write_text(Path(dir) / LAYOUT_FILE, json.dumps(rec, indent=1) + "\n")


def read_layout(dir: str | os.PathLike) -> dict:
    """The record of ``dir/layout.json`` with ``"layout"`` as a :class:`GridLayout`.
    Raises :class:`CheckpointError` when it is missing or not a grid model."""
    p = Path(dir) / LAYOUT_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: no grid model here (missing file)")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        if rec.get("format") != GRID_FORMAT:
            raise ValueError(f"format {rec.get('format')!r}")
        rec["layout"] = GridLayout.from_record(rec["layout"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: not an svdfill grid layout record ({e})") from None
    return rec


def load_grid_rows(dir: str | os.PathLike, name: str, table: str, lo: int, hi: int
                   ) -> dict[str, torch.Tensor]:
    """Rows ``[lo, hi)`` of the ``"user"`` (or ``"item"``) tables of ``name``:
    ``{"user_factors": [hi-lo, d], "user_bias": [hi-lo], ...}`` (every ``user_*`` table; or
    the item keys), on CPU,
    copied out of the memory-mapped rank files that overlap the range (only those are
    opened). Raises :class:`CheckpointError` on a missing or inconsistent file."""
    if table not in TABLE_KEYS:
        raise ValueError(f"load_grid_rows: table must be 'user' or 'item', got {table!r}")
    rec = read_layout(dir)
    layout: GridLayout = rec["layout"]
    n = layout.n_users if table == "user" else layout.n_items
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"load_grid_rows: rows [{lo}, {hi}) outside [0, {n})")
    fkey, bkey = TABLE_KEYS[table]
    bounds = layout.user_bounds if table == "user" else layout.item_bounds
    parts: dict[str, list[torch.Tensor]] = {}
    d = None
    for r, (a, b) in enumerate(bounds):
        s, e = max(a, lo), min(b, hi)
        if s >= e:
            continue
        path = Path(dir) / rank_file(name, r, layout.world_size)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing rank file of grid model {name!r}") from None
        except Exception as ex:  # torch raises many kinds for a truncated/foreign file
            raise CheckpointError(f"{path}: unreadable grid model file ({ex})") from None
        if obj[fkey].shape[0] != b - a or int(obj[f"{table}_lo"]) != a:
            raise CheckpointError(f"{path}: rows do not match the layout record")
        d = obj[fkey].shape[1]
        for k, v in obj.items():
            if k.startswith(table + "_") and k != f"{table}_lo":
                parts.setdefault(k, []).append(v[s - a:e - a].clone())
    if not parts:
        d = int(rec.get("factors", 0)) if d is None else d
        return {fkey: torch.zeros(0, d), bkey: torch.zeros(0)}
    return {k: torch.cat(v) for k, v in parts.items()}


def load_grid_extra(dir: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The replicated entries of ``name`` (neither ``user_*`` nor ``item_*``), from rank 0's
    file."""
    rec = read_layout(dir)
    path = Path(dir) / rank_file(name, 0, rec["layout"].world_size)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing rank file of grid model {name!r}") from None
    return {k: v for k, v in obj.items() if k.split("_", 1)[0] not in TABLE_KEYS}


def load_grid_block(dir: str | os.PathLike, name: str, layout: GridLayout, rank: int
                    ) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s blocks under ``layout`` (which may differ from the saved one): the
    four tables of :func:`save_grid_model`, re-blocked from the saved files."""
    (u_lo, u_hi), (i_lo, i_hi) = layout.user_bounds[rank], layout.item_bounds[rank]
    return {**load_grid_rows(dir, name, "user", u_lo, u_hi),
            **load_grid_rows(dir, name, "item", i_lo, i_hi)}


def remove_names(dir: str | os.PathLike, keep: set[str]) -> None:
    """Delete the rank files in ``dir`` whose name is not in ``keep`` (stale checkpoints)."""
    for p in Path(dir).glob("*.rank-*-of-*.pt"):
        if p.name.split(".rank-", 1)[0] not in keep:
            p.unlink(missing_ok=True)
