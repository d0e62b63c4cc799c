"""`svdfill train`: train biased MF on a config's ratings into a run directory.

``--launcher torchrun --nproc N`` reruns the same command as a one-machine torchrun job
(``python -m torch.distributed.run --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_train …``; see :mod:`svdfill.launch.launcher`).
"""

from __future__ import annotations

import argparse

from svdfill.launch.launcher import add_launcher_arguments, launch_torchrun, launcher_nproc

TORCHRUN_MODULE = "svdfill.launch.torchrun_train"


DEFAULT_RECIPE = "default"
"""The built-in recipe ``svdfill train --ratings FILE`` uses when no ``--config`` is given
(``configs/default.toml``: chosen for an unknown explicit-ratings data set)."""

SEPARATORS = {"tab": "\t", "\\t": "\t", "space": " ", "comma": ",", "semicolon": ";", "pipe": "|"}
"""Names (and the two-character ``\\t``) accepted by ``--sep`` for what a shell makes awkward."""


def add_data_arguments(parser: argparse.ArgumentParser, *, format: bool = True) -> None:
    """The options that say how to read a ratings file (``--sep``, ``--user-col``, …);
    shared by every command that takes ``--ratings``. ``format=False`` leaves ``--format``
    to a command that defines its own."""
    from svdfill.data.readers import FORMATS

    if format:
        parser.add_argument("--format", choices=FORMATS,
                            help="ratings file format (default auto: from the file name and first "
                                 "line); overrides data.format")
    parser.add_argument("--sep", metavar="SEP",
                        help="field separator of a text file: a character, or tab | space | comma | "
                             "semicolon | pipe (default: detected); overrides data.sep")
    parser.add_argument("--user-col", metavar="NAME",
                        help="user id column of a file with a header or of Parquet (default: user, "
                             "userId, user_id, … recognized); overrides data.user_col")
    parser.add_argument("--item-col", metavar="NAME",
                        help="item id column (default: item, itemId, movieId, item_id, … "
                             "recognized); overrides data.item_col")
    parser.add_argument("--rating-col", metavar="NAME",
                        help="rating column (default: rating, score, … recognized); overrides "
                             "data.rating_col")
    parser.add_argument("--scale", metavar="MIN:MAX",
                        help="valid rating range, e.g. 0.5:5; a rating outside it is an error "
                             "(default: the format's own, else taken from the data); overrides "
                             "data.scale_min and data.scale_max")


def add_arguments(parser: argparse.ArgumentParser, *, launcher: bool = True) -> None:
    """The options of ``svdfill train``; ``launcher=False`` leaves out ``--launcher`` and
    ``--nproc`` (for entry points that already are one rank of a distributed job)."""
    parser.add_argument("--config",
                        help="TOML config file, or a built-in preset name (e.g. demo, ml-100k); "
                             f"default: the general recipe configs/{DEFAULT_RECIPE}.toml with "
                             "the file's format, columns and scale detected (needs --ratings)")
    parser.add_argument("--out", required=True, help="run directory to create (runs/NAME)")
    parser.add_argument("--ratings", help="ratings file, folder, glob or URI; overrides data.path")
    add_data_arguments(parser)
    parser.add_argument("--dedupe", choices=["error", "last", "mean"],
                        help="duplicate (user, item) pairs: error (default) | keep the last | "
                             "average; overrides data.dedupe")
    parser.add_argument("--seed", type=int, help="training seed; overrides train.seed")
    parser.add_argument("--device", help="cpu | cuda | cuda:N; overrides train.device")
    parser.add_argument("--epochs", type=int, help="maximum epochs; overrides train.epochs")
    parser.add_argument("--init-from", metavar="RUN_DIR",
                        help="warm start from this run's rows (matched by raw id); overrides train.init_from")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no per-epoch lines")
    if launcher:
        add_launcher_arguments(parser, TORCHRUN_MODULE)


def parse_sep(text: str | None) -> str | None:
    """``--sep`` as the separator it names (``tab`` → a tab); None when not given."""
    if text is None:
        return None
    from svdfill.launch.errors import UserError

    sep = SEPARATORS.get(text.lower(), text)
    if not sep:
        raise UserError(f"--sep {text!r}: expected a separator such as ',' or tab | space | comma | "
                        "semicolon | pipe")
    return sep


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """``--scale MIN:MAX`` as (min, max); None when not given."""
    if text is None:
        return None
    import math

    from svdfill.launch.errors import UserError

    lo_text, colon, hi_text = text.partition(":")
    try:
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        lo = hi = math.nan
    if not colon or not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UserError(f"--scale {text!r}: expected MIN:MAX with MIN <= MAX, e.g. --scale 0.5:5")
    return lo, hi


def data_overrides(args: argparse.Namespace) -> dict:
    """Dotted ``data.*`` overrides of the file-reading options that were given."""
    scale = parse_scale(getattr(args, "scale", None))
    return {"data.format": getattr(args, "format", None), "data.sep": parse_sep(getattr(args, "sep", None)),
            "data.user_col": getattr(args, "user_col", None),
            "data.item_col": getattr(args, "item_col", None),
            "data.rating_col": getattr(args, "rating_col", None),
            "data.scale_min": scale[0] if scale else None, "data.scale_max": scale[1] if scale else None}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted config overrides of the command-line options that were given."""
    return {"data.path": getattr(args, "ratings", None), "data.dedupe": getattr(args, "dedupe", None),
            **data_overrides(args),
            "train.seed": getattr(args, "seed", None),
            "train.device": getattr(args, "device", None), "train.epochs": getattr(args, "epochs", None),
            "train.init_from": getattr(args, "init_from", None)}


def train_config(args: argparse.Namespace):
    """The config of a training command: ``--config`` (or, without one, the general recipe
    :data:`DEFAULT_RECIPE`, which then needs ``--ratings``) with the options applied."""
    from svdfill.config import apply_overrides, load_config
    from svdfill.launch.errors import UserError

    config = getattr(args, "config", None)
    if config is None and getattr(args, "ratings", None) is None:
        # the general recipe names no data: without a file it would quietly train on synthetic data
        raise UserError("no data to train on: give --ratings FILE (format, columns and scale are "
                        "detected) or --config CONFIG (e.g. demo, ml-100k)")
    return apply_overrides(load_config(config or DEFAULT_RECIPE), overrides_from_args(args))


def report_detected(cfg, log=print) -> bool:
    """Print how ``cfg.data`` will be read when it leaves something to detection (format
    auto); return whether the rating scale is left to the data (then the caller prints it)."""
    import math

    if not cfg.data.path:
        return False
    scale_given = not (math.isnan(cfg.data.scale_min) and math.isnan(cfg.data.scale_max))
    if cfg.data.format != "auto":
        return False
    from svdfill.config import resolve_data_path
    from svdfill.data.readers import detect_layout
    from svdfill.data.sources import is_uri

    d = cfg.data
    found = detect_layout(d.path if is_uri(d.path) else resolve_data_path(d.path), format=d.format,
                          sep=d.sep, user_col=d.user_col, item_col=d.item_col,
                          rating_col=d.rating_col)
    log(f"detected {found.describe()}" + (f"; scale {found.scale[0]:g}–{found.scale[1]:g} (the "
                                          "format's)" if found.scale and not scale_given else ""))
    return not scale_given and found.scale is None


def check_device(device: str) -> None:
    """Raise a UserError when ``device`` names CUDA and none is usable."""
    import torch

    from svdfill.launch.errors import UserError

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu")
        idx = torch.device(device).index
        if idx is not None and idx >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device != "cpu":
        raise UserError(f"device {device!r}: expected cpu, cuda or cuda:N")


def main(args: argparse.Namespace) -> int:
    import json

    nproc = launcher_nproc(args)
    if nproc is not None:
        cfg = train_config(args)  # config errors: one line, here
        if not args.quiet:
            report_detected(cfg)
        return launch_torchrun(TORCHRUN_MODULE, args, add_arguments, nproc)
    from svdfill.train import run_training

    cfg = train_config(args)
    check_device(cfg.train.device)
    data = None
    if not args.quiet and report_detected(cfg):
        # the scale comes from the data: read it here (once; the trainer takes it as read)
        # to say what it is before training on it
        from svdfill.data.dataset import load_dataset

        data = load_dataset(cfg.data)
        r = data[0].ratings
        print(f"ratings: {len(r):,} from {data[1].n_users:,} users on {data[1].n_items:,} items; "
              f"scale {float(r.min()):g}–{float(r.max()):g} taken from the data "
              "(--scale MIN:MAX to check against a fixed range)")
    summary = run_training(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet, data=data)
    keys = ("val_rmse", "val_mae", "val_mse", "best_epoch", "epochs_run", "train_seconds",
            "n_train", "n_val", "n_val_cold")
    print(json.dumps({k: summary.get(k) for k in keys} | {"run_dir": str(args.out)}))
    return 0
