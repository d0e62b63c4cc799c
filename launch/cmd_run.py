"""`svdfill run`: the main job — train on a config, then fill each user's top-k to Parquet.

With no options it runs the built-in synthetic preset (``configs/demo.toml``) into
``runs/demo`` and writes ``runs/demo/recs.parquet``, so a fresh clone can see the whole
data flow in one command; with ``--ratings FILE`` and no ``--config`` it trains the general
recipe of ``svdfill train`` (``configs/default.toml``) on the file. Rerunning resumes: training from its last checkpoint, the
export from its first unfinished block.
"""

from __future__ import annotations

import argparse

from svdfill.launch import cmd_train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="TOML config file or built-in preset name (default: the general recipe "
                             "configs/default.toml with --ratings, else demo, synthetic)")
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--recs", default=None,
                        help="Parquet output of the fill (default: RUN_DIR/recs.parquet)")
    parser.add_argument("--ratings", help="ratings file, folder, glob or URI; overrides data.path")
    cmd_train.add_data_arguments(parser)
    parser.add_argument("--dedupe", choices=["error", "last", "mean"],
                        help="duplicate (user, item) pairs; overrides data.dedupe")
    parser.add_argument("--seed", type=int, help="training seed; overrides train.seed")
    parser.add_argument("--device", help="cpu | cuda | cuda:N, for training and fill")
    parser.add_argument("--epochs", type=int, help="maximum epochs; overrides train.epochs")
    parser.add_argument("--k", type=int, default=None, help="items per user (default: fill.k)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in --out instead of resuming it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdfill.checkpoint import MODEL_FILE
    from svdfill.launch import cmd_fill

    run_dir = Path(args.out)
    done = (run_dir / MODEL_FILE).exists() and (run_dir / "summary.json").exists()
    if args.overwrite or not done:
        resume = run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite
        # no --config: `svdfill train`'s general recipe for a file, the demo preset without one
        config = args.config if args.config is not None or args.ratings else "demo"
        train_args = argparse.Namespace(config=config, out=str(run_dir), ratings=args.ratings,
                                        dedupe=args.dedupe, format=args.format, sep=args.sep,
                                        user_col=args.user_col, item_col=args.item_col,
                                        rating_col=args.rating_col, scale=args.scale,
                                        seed=args.seed, device=args.device, epochs=args.epochs,
                                        resume=resume, overwrite=args.overwrite, quiet=args.quiet)
        rc = cmd_train.main(train_args)
        if rc:
            return rc
    elif not args.quiet:
        print(f"svdfill: {run_dir} already holds a finished run; filling from it "
              "(--overwrite retrains)")
    # every `svdfill fill` option at its default (new options included), then ours
    fp = argparse.ArgumentParser(add_help=False)
    cmd_fill.add_arguments(fp, launcher=False)
    fill_args = fp.parse_args(["--model", str(run_dir),
                               "--out", args.recs or str(run_dir / "recs.parquet")])
    fill_args.k, fill_args.device = args.k, args.device
    fill_args.restart, fill_args.quiet = bool(args.overwrite), args.quiet
    return cmd_fill.main(fill_args)
