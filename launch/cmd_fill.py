"""`svdfill fill`: every unseen (user, item) pair scored, each user's top-k exported as Parquet.

Reads ``runs/NAME/model.pt`` (and ``seen.pt`` for ``--exclude-seen``, the default), checks
the options and hands the job to :func:`svdfill.fill.export.export_fill`, which streams one
Parquet row group per user block: the file appears atomically, and a killed export resumes
at the first unfinished block when the same command is run again. ``--full`` writes the
dense fill of every unseen pair instead.

Settings left out on the command line come from the run's ``[fill]`` config section.

``--launcher torchrun --nproc N`` reruns the same command as a one-machine torchrun job
(``python -m torch.distributed.run --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_fill …``): N item shards, the same Parquet file. Top-k only.

``--out DIR/`` (a trailing ``/``, or an existing folder) writes a partitioned Parquet dataset
instead (:func:`svdfill.fill.dataset.export_dataset`): ``part-NNNNN.parquet`` files and a
``_manifest.json`` written last; under torchrun every rank writes its own part.

``--items-allow`` / ``--items-deny`` / ``--exclude`` filter the items
(:mod:`svdfill.fill.filters`): applied to the model and seen sets before any fill path runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svdfill.distributed.sharded_fill import ShardedFill
    from svdfill.fill.dataset import BlockExchange

TORCHRUN_MODULE = "svdfill.launch.torchrun_fill"
ITEM_SPLITS = ("auto", "replicate", "shard")  # distributed.sharding.ITEM_SPLITS, kept import-light


def add_arguments(parser: argparse.ArgumentParser, *, launcher: bool = True) -> None:
    """The options of ``svdfill fill``; ``launcher=False`` leaves out ``--launcher`` and
    ``--nproc`` (for entry points that already are one rank of a distributed job)."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory of a trained model (runs/NAME) or its model.pt")
    parser.add_argument("--out", required=True, metavar="FILE.parquet|DIR/",
                        help="output Parquet file, or a folder (ending in /) for a partitioned dataset: "
                             "part-NNNNN.parquet files (one per torchrun rank) and _manifest.json")
    parser.add_argument("--k", type=int, default=None,
                        help="items per user (default: the run's fill.k); clamped to the number of items")
    parser.add_argument("--users", metavar="FILE", default=None,
                        help="only these users: a text file with one raw user id per line "
                             "('#' comments and blank lines skipped); output in file order (on a "
                             "grid run: each rank's part holds its user block's listed users, in "
                             "file order)")
    parser.add_argument("--items-allow", metavar="FILE", default=None,
                        help="only recommend these items: one raw item id per line ('#' comments)")
    parser.add_argument("--items-deny", metavar="FILE", default=None,
                        help="never recommend these items: one raw item id per line ('#' comments)")
    parser.add_argument("--exclude", metavar="FILE", default=None,
                        help="per-user exclusions: one 'user_id<TAB or comma>item_id' pair per line "
                             "('#' comments), dropped like seen items")
    parser.add_argument("--foldin", metavar="NEW_FILE", default=None,
                        help="first fold in the users of this ratings file (new users added, known "
                             "ones refit from it; items fixed, the run's own regularized solve, as "
                             "`svdfill foldin`) and fill for them (with --users: for those users "
                             "of the extended model instead)")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="skip ids the model does not know in --items-allow/--items-deny/--exclude "
                             "(a count is printed) instead of stopping with an error")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: the run's fill.device, cuda if it is cpu "
                             "and a GPU is present)")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                        help="drop items the user already rated (default: the run's fill.exclude_seen)")
    parser.add_argument("--full", action="store_true",
                        help="dense fill: every unseen (user, item) pair with its score, no top-k")
    parser.add_argument("--dtype", choices=["float32", "tf32", "bfloat16"], default=None,
                        help="compute dtype of the score GEMM (default: the run's fill.dtype)")
    parser.add_argument("--memory-budget-mb", type=int, default=None,
                        help="memory for score tiles in MiB (default: from free device memory)")
    parser.add_argument("--user-block", type=int, default=None,
                        help="users per Parquet row group (default: automatic)")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished export of the same file made with other settings")
    parser.add_argument("--item-split", choices=ITEM_SPLITS, default="auto",
                        help="items on each worker of a torchrun partitioned export (--out DIR/) or a "
                             "Ray fill: replicate (every worker holds all items and fills its own "
                             "users, no traffic per block), shard (each holds 1/W of them; every "
                             "block is computed by all and merged: for item tables too big for one "
                             "worker), auto (default: replicate up to a 512 MiB item table)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    if launcher:
        from svdfill.launch.launcher import add_launcher_arguments

        add_launcher_arguments(parser, TORCHRUN_MODULE)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def warn(msg: str) -> None:
    print(f"svdfill: warning: {msg}", file=sys.stderr)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_user_list(path: str | os.PathLike, idmap: Any):
    """:func:`read_id_list` of users (``--users``)."""
    return read_id_list(path, idmap, "user")


def read_id_list(path: str | os.PathLike, idmap: Any, side: str, *, skip_unknown: bool = False,
                 hint: str = ""):
    """Contiguous ids (int64 numpy [n], file order, first occurrence kept) of the raw
    ``side`` ("user" or "item") ids listed in ``path``, one per line ('#' comments and blank
    lines skipped). Raises UserError, naming file and line, for unreadable files, ids of the
    wrong type, unknown ids (listing a few) and empty lists. ``skip_unknown``: unknown ids
    are dropped with a printed count instead (the result may then be empty); ``hint`` ends
    the unknown-id error (an option that helps)."""
    import numpy as np

    from svdfill.launch.errors import UserError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the {side} list: {e}") from None
    raw, lines = [], []
    want_int = getattr(idmap, f"{side}_dtype") == "int64"
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if want_int:
            try:
                s = int(s)
            except ValueError:
                raise UserError(f"{p}:{n}: not an integer {side} id: {line.strip()[:60]!r} "
                                f"(the model's {side} ids are integers)") from None
        raw.append(s)
        lines.append(n)
    if not raw:
        raise UserError(f"{p}: no {side} ids in the file")
    arr = np.asarray(raw, dtype=np.int64) if want_int else np.asarray(raw, dtype=object)
    idx = getattr(idmap, f"encode_{side}s")(arr)
    unknown = np.nonzero(idx < 0)[0]
    if unknown.size and skip_unknown:
        warn(f"{p}: {unknown.size} {side} id(s) not in the model skipped (--skip-unknown)")
        idx = idx[idx >= 0]
    elif unknown.size:
        shown = ", ".join(f"{raw[j]!r} (line {lines[j]})" for j in unknown[:5])
        more = f" and {unknown.size - 5} more" if unknown.size > 5 else ""
        raise UserError(f"{p}:{lines[unknown[0]]}: {unknown.size} {side} id(s) not in the model: "
                        f"{shown}{more}{hint}")
    _, first = np.unique(idx, return_index=True)
    if first.size < idx.size:
        warn(f"{p}: {idx.size - first.size} duplicate {side} id(s) ignored (first occurrence kept)")
        idx = idx[np.sort(first)]
    return idx.astype(np.int64)


def read_pair_list(path: str | os.PathLike, idmap: Any, *, skip_unknown: bool = False):
    """Per-user exclusions (``--exclude``): ``(users, items)``, contiguous ids int64 numpy
    [n] each, of the raw ``user_id<TAB or comma>item_id`` pairs listed in ``path``, one per
    line ('#' comments and blank lines skipped). Raises UserError naming file:line for an
    unreadable file, a line that is not two fields, ids of the wrong type and unknown ids
    (``skip_unknown``: such pairs dropped with a printed count instead)."""
    import re

    import numpy as np

    from svdfill.launch.errors import UserError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the exclusion list: {e}") from None
    cols: tuple[list, list] = ([], [])
    lines = []
    want_int = (idmap.user_dtype == "int64", idmap.item_dtype == "int64")
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = [f.strip() for f in re.split(r"[\t,]", s)]
        if len(fields) != 2 or not all(fields):
            raise UserError(f"{p}:{n}: expected 'user_id<TAB or comma>item_id', got {s[:60]!r}")
        for j, (side, f) in enumerate(zip(("user", "item"), fields)):
            if want_int[j]:
                try:
                    f = int(f)
                except ValueError:
                    raise UserError(f"{p}:{n}: not an integer {side} id: {f[:60]!r} "
                                    f"(the model's {side} ids are integers)") from None
            cols[j].append(f)
        lines.append(n)
    if not lines:
        raise UserError(f"{p}: no (user, item) pairs in the file")
    idx = [idmap.encode_users(np.asarray(cols[0], dtype=np.int64 if want_int[0] else object)),
           idmap.encode_items(np.asarray(cols[1], dtype=np.int64 if want_int[1] else object))]
    bad = (idx[0] < 0) | (idx[1] < 0)
    if bad.any() and not skip_unknown:
        j = int(np.nonzero(bad)[0][0])
        side = "user" if idx[0][j] < 0 else "item"
        raise UserError(f"{p}:{lines[j]}: {side} id {cols[side == 'item'][j]!r} not in the model "
                        f"({int(bad.sum())} pair(s) with unknown ids; --skip-unknown skips them)")
    if bad.any():
        warn(f"{p}: {int(bad.sum())} pair(s) with ids not in the model skipped (--skip-unknown)")
    return idx[0][~bad].astype(np.int64), idx[1][~bad].astype(np.int64)


def _agreed(exchange, fn) -> None:
    """``fn()`` here; under a partitioned export's ``exchange`` its UserError is raised on
    every rank alike (the lowest rank's), so none waits in a collective for one that gave up."""
    from svdfill.launch.errors import UserError

    try:
        fn()
        err = None
    except UserError as e:
        if exchange is None:
            raise
        err = str(e)
    if exchange is not None:
        errs = [e for e in exchange.all_gather(err) if e]
        if errs:
            raise UserError(errs[0])


def fold_in_for_fill(model: Any, path: str, *, device: str | None = None, quiet: bool = False):
    """``--foldin``: the run's model with the users of ``path`` folded in
    (:func:`svdfill.train.foldin.fold_in`, read with the model's data settings; the run's
    seen sets carried over and extended): a :class:`~svdfill.train.foldin.FoldIn`.
    Deterministic, so torchrun ranks that each fold in get the same tables."""
    from svdfill.checkpoint import SEEN_FILE, load_seen
    from svdfill.launch.cmd_eval import read_for_model
    from svdfill.train.foldin import fold_in

    run_dir = model.path.parent
    seen = load_seen(run_dir) if (run_dir / SEEN_FILE).exists() else None
    where = "cpu" if device is None or device == "auto" else device
    result = fold_in(model, read_for_model(model, path), seen=seen, device=where)
    i = result.info
    if not quiet:
        skipped = (f"; skipped {i['ratings_skipped']:,} ratings of {i['unknown_items']:,} items the "
                   f"model does not know" if i["ratings_skipped"] else "")
        print(f"svdfill: folded in {i['users_folded']:,} users ({i['users_new']:,} new, "
              f"{i['users_refit']:,} refit) from {path}{skipped}", file=sys.stderr)
    return result


def read_filters(args: argparse.Namespace, idmap: Any) -> tuple[dict, dict]:
    """The filter options as :func:`svdfill.fill.filters.filter_fill_inputs` arguments
    (``allow``, ``deny``, ``exclude``) and their provenance (file hashes, which key the
    resume and are written to the Parquet metadata). Both empty without filters."""
    # getattr: callers that build their own Namespace (`svdfill run`) have no filter options
    allow, deny, exclude = (getattr(args, a, None) for a in ("items_allow", "items_deny", "exclude"))
    skip = bool(getattr(args, "skip_unknown", False))
    hint = "; --skip-unknown skips them"
    kw: dict = {}
    prov: dict = {}
    if allow:
        kw["allow"] = read_id_list(allow, idmap, "item", skip_unknown=skip, hint=hint)
        prov["items_allow_sha256"] = file_sha256(allow)
    if deny:
        kw["deny"] = read_id_list(deny, idmap, "item", skip_unknown=skip, hint=hint)
        prov["items_deny_sha256"] = file_sha256(deny)
    if exclude:
        kw["exclude"] = read_pair_list(exclude, idmap, skip_unknown=skip)
        prov["exclude_sha256"] = file_sha256(exclude)
    return kw, prov


def resolve_device(name: str | None):
    import torch

    from svdfill.launch.errors import UserError

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return dev


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------

def main(args: argparse.Namespace, *, sharded: ShardedFill | None = None,
         exchange: BlockExchange | None = None) -> int:
    """Validate the options, resolve the rest from the run's config, run
    :func:`svdfill.fill.export.export_fill`. ``sharded``: a
    :class:`svdfill.distributed.sharded_fill.ShardedFill` (torchrun ranks, Ray actors) that
    computes the top-k over item shards elsewhere while this process writes the same file;
    it is started here, once the settings are known. ``exchange``: this process is one rank
    of a partitioned export (``--out DIR/`` under torchrun; every rank calls this with the
    same arguments and writes its own part)."""
    from svdfill.launch.launcher import launch_torchrun, launcher_nproc
    from svdfill.launch.errors import UserError

    if args.k is not None and args.k <= 0:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.memory_budget_mb is not None and args.memory_budget_mb <= 0:
        raise UserError(f"--memory-budget-mb must be positive, got {args.memory_budget_mb}")
    if args.user_block is not None and args.user_block <= 0:
        raise UserError(f"--user-block must be positive, got {args.user_block}")
    nproc = launcher_nproc(args)  # None where the parser has no --launcher (torchrun, Ray)
    if nproc is not None:
        if args.full:
            raise UserError("--full is written by one process: run `svdfill fill --full` "
                            "without --launcher torchrun")
        return launch_torchrun(TORCHRUN_MODULE, args, add_arguments, nproc)
    from svdfill.launch import fill_grid

    grid = fill_grid.grid_model_dir(args.model)
    if grid is not None and exchange is None and sharded is None:
        return fill_grid.main(args, grid)  # a grid run: the ring fill (W = 1 here)
    from svdfill.checkpoint import SEEN_FILE, load_model, load_seen
    from svdfill.data.export import check_writable
    from svdfill.fill.dataset import export_dataset, is_dataset_path
    from svdfill.fill.export import RANK_MAX, export_fill
    from svdfill.kernels.fill import device_dtype

    from svdfill.fill.publish import Target, is_remote, local_out, publish

    # an object store (s3://, gs://, …): built in a local staging folder, then uploaded
    target = Target(args.out) if is_remote(args.out) else None
    out_path = local_out(args.out) if target is not None else args.out
    dataset = is_dataset_path(out_path)
    out = Path(out_path)
    if not dataset:
        check_writable(out)
    elif args.full and (exchange is not None or sharded is not None):
        raise UserError("--full is written by one process: run `svdfill fill --full` instead")
    model = load_model(args.model)
    fcfg = model.config.fill
    run_dir = model.path.parent
    n_items = model.n_items
    k = fcfg.k if args.k is None else args.k
    if not args.full:
        if k > n_items:
            warn(f"--k {k} is more than the model's {n_items} items: using k = {n_items}")
            k = n_items
        if k > RANK_MAX:
            raise UserError(f"--k {k}: ranks are int16, so k is at most {RANK_MAX} (use --full for every pair)")
    exclude = fcfg.exclude_seen if args.exclude_seen is None else args.exclude_seen
    seen = None
    provenance = {"model_sha256": file_sha256(model.path)}
    if exclude:
        if not (run_dir / SEEN_FILE).exists():
            raise UserError(f"{run_dir / SEEN_FILE}: missing, so seen items cannot be excluded "
                            f"(rerun with --no-exclude-seen to keep them)")
        seen = load_seen(run_dir)["all"]
        if seen[0].numel() != model.n_users + 1 or (seen[1].numel() and int(seen[1].max()) >= n_items):
            raise UserError(f"{run_dir / SEEN_FILE}: seen sets do not match the model "
                            f"({model.n_users} users × {n_items} items)")
        provenance["seen_sha256"] = file_sha256(run_dir / SEEN_FILE)
    state, idmap = model.state, model.idmap
    users = None
    if args.foldin:
        folded = fold_in_for_fill(model, args.foldin, device=args.device, quiet=args.quiet)
        state, idmap = folded.state, folded.idmap
        seen = folded.seen["all"] if exclude else None
        provenance["foldin_sha256"] = file_sha256(args.foldin)
        if not args.users:  # the folded users, in id order
            users = idmap.encode_users(folded.users).astype("int64")
    if args.users:
        users = read_user_list(args.users, idmap)
    filters, filter_prov = read_filters(args, idmap)
    if filters:
        # applied outside the kernels (compacted item table, exclusions merged into the seen
        # sets), so they hold for the tiles, the fused fill and every sharded path alike
        from svdfill.fill.filters import filter_fill_inputs

        try:
            state, idmap, seen, allowed = filter_fill_inputs(state, idmap, seen, **filters)
        except ValueError as e:
            raise UserError(f"--items-allow/--items-deny: {e}") from None
        provenance.update(filter_prov)
        if allowed is not None and not args.full and k > allowed.numel():
            warn(f"--k {k} is more than the {allowed.numel()} items the filters allow: "
                 f"using k = {allowed.numel()}")
            k = int(allowed.numel())
    device = resolve_device(args.device if args.device is not None else
                            (None if fcfg.device == "cpu" else fcfg.device))
    dtype = args.dtype or fcfg.dtype
    local = sharded is None or not sharded.shards_pick_dtype  # Ray actors choose for their devices
    if args.dtype is None and local and device_dtype(dtype, device) != dtype:
        if not args.quiet:
            print(f"svdfill: fill.dtype = {dtype} is a GPU setting; computing in float32 on "
                  f"{device} (--dtype {dtype} forces it)")
        dtype = device_dtype(dtype, device)
    budget_mb = args.memory_budget_mb if args.memory_budget_mb is not None else fcfg.memory_budget_mb
    block = args.user_block if args.user_block is not None else (fcfg.user_block or None)
    budget = budget_mb * 2**20 if budget_mb else None
    if sharded is not None and args.full:
        raise UserError("--full is written by one process: run `svdfill fill --full` instead")
    if sharded is not None:
        sharded.start(state, seen, k=k, device=device, dtype=dtype, memory_budget=budget)
    if exchange is not None:
        exchange.start(state, seen, k=k, device=device, dtype=dtype, memory_budget=budget)
    common = dict(k=k, seen=seen, users=users, full=args.full, device=device, dtype=dtype,
                  memory_budget=budget, user_block=block, restart=args.restart, quiet=args.quiet,
                  provenance=provenance, sharded=sharded)
    if target is not None:
        _agreed(exchange, lambda: target.prepare(restart=args.restart)
                if exchange is None or exchange.rank == 0 else None)
    if dataset and sharded is not None and hasattr(sharded, "export_parts"):
        summary = sharded.export_parts(state, idmap, out_path, **common)  # Ray: each actor its part
    elif dataset:
        summary = export_dataset(state, idmap, out_path, exchange=exchange, **common)
    else:
        summary = export_fill(state, idmap, out, **common)
    if target is not None:
        barrier = None if exchange is None else (lambda: exchange.all_gather(None))
        summary["bytes_uploaded"] = publish(target, out_path, rank=exchange.rank if exchange else 0,
                                            size=exchange.size if exchange else 1, barrier=barrier)
        summary["path"] = target.shown
    if not args.quiet:
        what = "every unseen pair" if args.full else f"top-{k}"
        if dataset:
            resumed = (f", {summary['resumed_blocks']} finished blocks kept" if summary["resumed_blocks"]
                       else "")
            where = f"{summary['parts']} part(s), {summary['blocks']} row groups"
        else:
            resumed = f", resumed at block {summary['resumed_at']}" if summary["resumed_at"] else ""
            where = f"{summary['blocks']} row groups"
        from svdfill.kernels.dispatch import kernel_choices

        kernels = sorted({c["kernel"] for c in kernel_choices().values()})
        how = f" ({'/'.join(kernels)} fill kernel)" if kernels and not args.full else ""
        print(f"svdfill: wrote {what} of {summary['users']:,} users to {summary['path']} "
              f"({where}{resumed}) in {summary['seconds']:.1f} s on {device}{how}")
    return 0
