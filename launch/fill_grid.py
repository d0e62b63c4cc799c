"""``svdfill fill`` on a grid run (trained with ``[dist] layout = "grid"``): the ring fill.

A grid run keeps its model as ``RUN/grid_model/`` (``layout.json``, one ``model`` and one
``seen`` file per rank, ``idmap.pt``; :mod:`svdfill.distributed.grid_checkpoint`). Every
rank loads only its user block and its item block (re-blocked from the saved files when
the fill runs at another W), the item blocks visit every rank around a ring
(:func:`svdfill.fill.grid_fill.grid_topk`) and each rank writes its own users' part of the
dataset (:func:`svdfill.fill.dataset.export_grid_dataset`): ``--out DIR/`` only, since a
single file would need one writer holding every user's lists. Item filters apply on each
rank's blocks (:func:`_apply_filters`).

``--users FILE``: every rank reads the list (:func:`svdfill.launch.cmd_fill.read_user_list`:
the same checks, errors and duplicate rule as any fill, so every rank stops alike on a bad
file) and keeps the listed users of its own user block; only their rows are scored around
the ring and its part holds only them, in list order. The dataset read back is the
one-process ``--users`` fill's rows grouped by user block (parts in rank order; at W = 1,
or for a list that names the blocks' users block by block, the list order itself). A rank
with none of the listed users still passes the item blocks on and writes an empty part.
The list's hash keys the resume, as for any fill: a killed run is resumed only with the
same list. ``--full`` and ``--foldin`` are refused on a grid model. Called by
:func:`svdfill.launch.cmd_fill.main` (one process) and by every torchrun rank
(:mod:`svdfill.launch.torchrun_fill`).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

GRID_MODEL_DIR = "grid_model"


def grid_model_dir(model: str) -> Path | None:
    """The grid model folder of ``--model`` (a run directory holding ``grid_model/``, or the
    folder itself), or None for a one-table model."""
    p = Path(model)
    for d in (p / GRID_MODEL_DIR, p):
        if (d / "layout.json").is_file():
            return d
    return None


def load_grid_seen(mdir: Path, saved, lo: int, hi: int, which: str = "all"):
    """Seen CSR of users ``[lo, hi)`` (rows local, GLOBAL item ids) from the per-rank
    ``seen`` files of the saved layout ``saved`` (only the overlapping ones are read)."""
    from svdfill.checkpoint import CheckpointError
    from svdfill.distributed.grid_checkpoint import rank_file
    from svdfill.kernels.topk import csr_slice

    ptrs, idxs, base = [torch.zeros(1, dtype=torch.int64)], [], 0
    for r, (a, b) in enumerate(saved.user_bounds):
        s, e = max(a, lo), min(b, hi)
        if s >= e:
            continue
        path = mdir / rank_file("seen", r, saved.world_size)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing seen file of the grid model") from None
        ip, ix = csr_slice(obj[f"{which}_indptr"].to(torch.int64), obj[f"{which}_indices"],
                           s - a, e - a)
        ptrs.append(ip[1:] + base)
        idxs.append(ix.clone())
        base += int(ip[-1])
    indices = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.int64)
    return torch.cat(ptrs), indices


def _model_sha256(mdir: Path, saved, rank: int, size: int, all_gather) -> str:
    """One hash of the saved model: each rank hashes a share of the files, rank order."""
    from svdfill.distributed.grid_checkpoint import LAYOUT_FILE, rank_file
    from svdfill.launch.cmd_fill import file_sha256

    files = [LAYOUT_FILE] + [rank_file("model", r, saved.world_size)
                             for r in range(saved.world_size)]
    mine = {f: file_sha256(mdir / f) for n, f in enumerate(files) if n % size == rank}
    every = {}
    for part in all_gather(mine):
        every.update(part)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}:{every[f]}\n".encode())
    return h.hexdigest()


def check_out(out: str) -> None:
    """A grid fill writes a local dataset folder (``--out DIR/``), one part per rank: a
    single file would need one writer holding every user's lists. Raises UserError."""
    from svdfill.fill.dataset import is_dataset_path
    from svdfill.launch.errors import UserError

    if not is_dataset_path(out) or "://" in str(out):
        raise UserError(f"--out {out}: a grid model fills into a local dataset folder (give "
                        f"--out DIR/): each rank writes its own users' part")


def _apply_filters(args, idmap, tables: dict, seen, layout, rank: int):
    """``--items-allow`` / ``--items-deny`` / ``--exclude`` on this rank's blocks; returns
    ``(seen, provenance)``. Every rank reads the files (their errors are the same on every
    rank, so all stop alike). A blocked item's bias in this rank's item block becomes −inf:
    it scores −inf wherever the block travels, which the fill drops like a seen item — the
    one-process compaction's result, with no table rebuilt. Exclusions of this rank's users
    join its seen CSR (global item ids)."""
    import torch

    from svdfill.fill.filters import allowed_items, merge_exclusions
    from svdfill.launch import cmd_fill
    from svdfill.launch.errors import UserError

    filters, prov = cmd_fill.read_filters(args, idmap)
    if not filters:
        return seen, prov
    n_items = int(layout.n_items)
    (u_lo, u_hi), (i_lo, i_hi) = layout.user_bounds[rank], layout.item_bounds[rank]
    if "allow" in filters or "deny" in filters:
        allowed = allowed_items(n_items, filters.get("allow"), filters.get("deny"))
        if allowed.numel() == 0:
            raise UserError("the item filters leave no item to fill")
        blocked = torch.ones(n_items, dtype=torch.bool)
        blocked[allowed] = False
        bias = tables["item_bias"].to(torch.float32).clone()
        bias[blocked[i_lo:i_hi].to(bias.device)] = float("-inf")
        tables["item_bias"] = bias
    if "exclude" in filters:
        users, items = (torch.as_tensor(x, dtype=torch.int64) for x in filters["exclude"])
        mine = (users >= u_lo) & (users < u_hi)
        seen = merge_exclusions(seen, users[mine] - u_lo, items[mine], int(u_hi) - int(u_lo), n_items)
    return seen, prov


def main(args: argparse.Namespace, mdir: Path, world=None) -> int:
    """The grid fill of ``args`` (``svdfill fill`` options) on this rank of ``world``
    (``None``: one process)."""
    from svdfill.data.idmap import IdMap
    from svdfill.distributed.grid import GridLayout, grid_bounds
    from svdfill.distributed.grid_checkpoint import load_grid_block, read_layout
    from svdfill.distributed.ring import Ring
    from svdfill.distributed.world import World
    from svdfill.fill.dataset import export_grid_dataset
    from svdfill.fill.export import RANK_MAX
    from svdfill.kernels.fill import device_dtype
    from svdfill.launch.cmd_fill import resolve_device, warn
    from svdfill.launch.errors import UserError

    world = world or World()
    rank, W = world.rank, world.world_size
    for opt, name in ((args.full, "--full"), (getattr(args, "foldin", None), "--foldin")):
        if opt:
            raise UserError(f"{name} is not supported on a grid model ({mdir}) yet")
    check_out(args.out)
    rec = read_layout(mdir)
    saved = rec["layout"]
    n_users, n_items = saved.n_users, saved.n_items
    layout = saved if saved.world_size == W else GridLayout(
        n_users, n_items, grid_bounds(n_users, W), grid_bounds(n_items, W))
    fcfg = (rec.get("config") or {}).get("fill", {})
    k = int(fcfg.get("k", 100) if args.k is None else args.k)
    if k > n_items:
        if not args.quiet and rank == 0:
            warn(f"--k {k} is more than the model's {n_items} items: using k = {n_items}")
        k = n_items
    if k > RANK_MAX:
        raise UserError(f"--k {k}: ranks are int16, so k is at most {RANK_MAX}")
    exclude = bool(fcfg.get("exclude_seen", True)) if args.exclude_seen is None else args.exclude_seen
    device = resolve_device(args.device if args.device is not None else
                            (None if fcfg.get("device", "cpu") == "cpu" else fcfg["device"]))
    if W > 1:
        device = world.device
    dtype = args.dtype or fcfg.get("dtype", "float32")
    if args.dtype is None and device_dtype(dtype, device) != dtype:
        dtype = device_dtype(dtype, device)
    budget_mb = args.memory_budget_mb if args.memory_budget_mb is not None else fcfg.get("memory_budget_mb", 0)
    block = args.user_block if args.user_block is not None else (fcfg.get("user_block") or None)

    (u_lo, u_hi) = layout.user_bounds[rank]
    tables = load_grid_block(mdir, "model", layout, rank)
    tables["global_mean"] = float(rec["global_mean"])
    seen = load_grid_seen(mdir, saved, u_lo, u_hi) if exclude else None
    idmap = IdMap.from_state(torch.load(mdir / rec.get("idmap", "idmap.pt"), weights_only=True))
    users = None
    if args.users:
        # every rank reads the list: a bad one raises the same UserError on every rank, before
        # any collective; its warnings (duplicates) are printed once, by rank 0
        import contextlib
        import io

        from svdfill.launch.cmd_fill import read_user_list

        with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
            users = read_user_list(args.users, idmap)

    if W > 1:
        import torch.distributed as dist

        def all_gather(obj):
            out = [None] * W
            dist.all_gather_object(out, obj)
            return out
    else:
        def all_gather(obj):
            return [obj]
    prov = {"model_sha256": _model_sha256(mdir, saved, rank, W, all_gather)}
    seen, fprov = _apply_filters(args, idmap, tables, seen, layout, rank)
    prov.update(fprov)
    ring = Ring(world)
    summary = export_grid_dataset(tables, idmap, args.out, layout=layout, rank=rank, ring=ring,
                                  all_gather=all_gather, k=k, seen=seen, users=users, device=device,
                                  dtype=dtype, memory_budget=budget_mb * 2**20 if budget_mb else None,
                                  user_block=block, restart=args.restart,
                                  quiet=args.quiet or rank != 0, provenance=prov)
    sent = all_gather(summary["ring_bytes_sent"])
    if rank == 0 and not args.quiet:
        resumed = (f", {summary['resumed_blocks']} finished blocks kept"
                   if summary["resumed_blocks"] else "")
        print(f"svdfill: wrote top-{k} of {summary['users']:,} users to {summary['path']} "
              f"({summary['parts']} part(s) of a grid of {W}, {summary['blocks']} row groups"
              f"{resumed}; ring sent {max(sent):,} B/rank max) in {summary['seconds']:.1f} s")
    return 0
