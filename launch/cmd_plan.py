"""`svdfill plan --users N --items M --ratings R --factors d --workers W --device h100|cpu`:
per-rank memory, bytes sent per sweep/epoch and by the fill, and time estimates for the
``items`` and ``grid`` layouts side by side, and which of them fits.

The estimates come from :mod:`svdfill.plan.estimate` and a device profile: the documented
defaults of ``--device`` (:mod:`svdfill.plan.profile`), or ``--profile FILE.json`` written by
``svdfill plan --calibrate --out FILE.json`` (which measures this machine: a batched GEMM,
a batched Cholesky, row gathers, a copy, a gloo all-reduce on loopback). ``--json`` prints
the same figures for machines. A prediction, not a measurement: ``svdfill bench plan``
checks it against real runs.
"""

from __future__ import annotations

import argparse

from svdfill.launch.cmd_synth import _count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=_count, help="users U (accepts 100M, 600k)")
    parser.add_argument("--items", type=_count, help="items I")
    parser.add_argument("--ratings", type=_count, help="training ratings R")
    parser.add_argument("--factors", type=int, default=64, help="factors d (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="ranks W (default 1)")
    parser.add_argument("--device", choices=("h100", "cpu"), default="cpu",
                        help="default device profile (default cpu: this machine's cores and RAM)")
    parser.add_argument("--profile", metavar="FILE.json",
                        help="a profile written by --calibrate (replaces --device's defaults)")
    parser.add_argument("--solver", choices=("als", "sgd"), default="als",
                        help="als (default) | sgd (under the grid layout: DSGD)")
    parser.add_argument("--optimizer", choices=("sgd", "adam", "sparse_adam", "adagrad"),
                        default="sgd", help="optimizer of --solver sgd (default sgd: Funk SGD)")
    parser.add_argument("--layout", choices=("both", "items", "grid"), default="both",
                        help="which layouts to show (default both, side by side)")
    parser.add_argument("--batch-size", type=int, default=1024, help="SGD ratings per step (default 1024)")
    parser.add_argument("--topk", type=int, default=100, help="k of the fill (default 100)")
    parser.add_argument("--zipf", type=float, default=0.8,
                        help="item-popularity power-law exponent (default 0.8, as svdfill synth)")
    parser.add_argument("--user-skew", type=float, default=0.5,
                        help="user-activity power-law exponent (default 0.5, as svdfill synth)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine's profile (a few seconds; its GEMM and solve "
                             "rates at rows of --factors + 1 columns) instead of planning")
    parser.add_argument("--out", metavar="FILE.json", help="with --calibrate: write the profile here")
    parser.add_argument("--no-network", action="store_true",
                        help="with --calibrate: skip the 2-process all-reduce (keep the defaults)")


def _profile(args):
    from svdfill.launch.errors import UserError
    from svdfill.plan.profile import load_profile, profile_for

    if args.profile:
        try:
            return load_profile(args.profile)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"--profile {args.profile}: {e}") from None
    return profile_for(args.device)


def main(args: argparse.Namespace) -> int:
    import json

    from svdfill.launch.errors import UserError

    if args.calibrate:
        from svdfill.plan.profile import calibrate, save_profile

        prof = calibrate(network=not args.no_network, k=args.factors + 1)
        if args.out:
            save_profile(prof, args.out)
        print(json.dumps(prof.to_json(), indent=2))
        return 0
    if args.out:
        raise UserError("--out goes with --calibrate")
    missing = [f"--{n}" for n in ("users", "items", "ratings") if getattr(args, n) is None]
    if missing:
        raise UserError(f"svdfill plan needs {', '.join(missing)} (or --calibrate)")
    from svdfill.plan.estimate import Problem, estimate, render

    p = Problem(n_users=args.users, n_items=args.items, n_ratings=args.ratings, factors=args.factors,
                workers=args.workers, solver=args.solver, optimizer=args.optimizer,
                batch_size=args.batch_size, topk=args.topk, zipf=args.zipf, user_skew=args.user_skew)
    try:
        p.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    prof = _profile(args)
    layouts = ("items", "grid") if args.layout == "both" else (args.layout,)
    ests = [estimate(p, prof, lay) for lay in layouts]
    if args.json:
        import dataclasses

        print(json.dumps({"problem": dataclasses.asdict(p), "profile": prof.to_json(),
                          "estimates": [e.to_json() for e in ests]}, indent=2))
    else:
        print(render(p, prof, ests))
    return 0
