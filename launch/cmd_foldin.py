"""`svdfill foldin`: solve p_u, b_u of new or changed users with the items fixed; write a run.

Reads ``NEW_FILE`` with the model's data settings (columns, separator, scale, dedupe;
format auto-detected unless ``--format``), folds its users in with
:func:`svdfill.train.foldin.fold_in` (the user half of one ALS sweep, the run's own
penalties) and writes ``--out`` as a run directory ``svdfill fill --model`` reads. Users not
in the file keep their rows bit for bit; a user in the file is solved from the file's
ratings only. Items the model does not know are skipped with a count (``--strict``: an error).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory of a trained model (runs/NAME) or its model.pt")
    parser.add_argument("--ratings", required=True, metavar="NEW_FILE",
                        help="ratings of the users to fold in (new users are added, known ones refit)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run directory to write (model.pt, seen.pt, config.toml, summary.json)")
    from svdfill.launch.cmd_eval import add_model_data_arguments

    add_model_data_arguments(parser)
    parser.add_argument("--strict", action="store_true",
                        help="refuse ratings of items the model does not know (default: skip and count)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (where the solves run)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--quiet", action="store_true", help="no summary line")


def main(args: argparse.Namespace) -> int:
    import sys

    from svdfill.checkpoint import SEEN_FILE, load_model, load_seen
    from svdfill.launch.cmd_eval import read_with_options
    from svdfill.launch.cmd_train import check_device
    from svdfill.train.foldin import fold_in, write_foldin_run

    check_device(args.device)
    model = load_model(args.model)
    raw = read_with_options(model, args)
    run_dir = model.path.parent
    seen = None
    if (run_dir / SEEN_FILE).exists():
        seen = load_seen(run_dir)
    elif not args.quiet:
        print(f"svdfill: warning: {run_dir / SEEN_FILE}: missing, so the old users' seen items "
              f"are not carried over (the fill will not exclude them)", file=sys.stderr)
    result = fold_in(model, raw, seen=seen, strict=args.strict, device=args.device)
    out = write_foldin_run(args.out, result, model, overwrite=args.overwrite)
    if not args.quiet:
        i = result.info
        if i["ratings_skipped"]:
            print(f"svdfill: skipped {i['ratings_skipped']:,} ratings of {i['unknown_items']:,} "
                  f"items the model does not know"
                  + (f" ({i['users_skipped']:,} users had no other rating)" if i["users_skipped"] else ""),
                  file=sys.stderr)
        print(f"svdfill: folded in {i['users_folded']:,} users ({i['users_new']:,} new, "
              f"{i['users_refit']:,} refit) from {i['ratings_used']:,} ratings; wrote {out}")
    return 0
