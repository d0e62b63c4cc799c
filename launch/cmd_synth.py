"""`svdfill synth --out FILE.parquet`: write planted low-rank ratings as Parquet.

Sizes come from ``[data.synthetic]`` of ``--config`` (defaults when none), each
overridable on the command line. The file has columns ``user``, ``item``, ``rating`` and
reads back with ``format = "parquet"`` and the default column names; it appears
atomically (temporary name in the same folder, renamed when complete).
"""

from __future__ import annotations

import argparse

_OVERRIDES = {
    "users": ("n_users", int, "number of users"),
    "items": ("n_items", int, "number of items"),
    "ratings": ("n_ratings", int, "number of ratings (distinct user-item pairs)"),
    "rank": ("rank", int, "rank of the planted factors"),
    "noise": ("noise", float, "Gaussian noise σ (the RMSE floor)"),
    "zipf": ("zipf", float, "item-popularity power-law exponent (0 = uniform)"),
    "user_skew": ("user_skew", float, "user-activity power-law exponent (0 = uniform)"),
    "mean": ("mean", float, "global mean rating μ"),
    "seed": ("seed", int, "generator seed"),
}


def _count(text: str) -> int:
    """Integers with optional thousands separators or a k/M/G/B suffix: 100M, 600k, 10B, 2_000."""
    t = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:].lower(), 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = float(t) * scale if "." in t or "e" in t.lower() else int(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="output Parquet file")
    parser.add_argument("--config", metavar="CFG",
                        help="TOML config (or preset name) whose [data.synthetic] gives the defaults")
    for flag, (_, tp, help_) in _OVERRIDES.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=_count if tp is int else float,
                            default=None, help=help_)
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from svdfill.config import apply_overrides, load_config
    from svdfill.data.synth import write_parquet
    from svdfill.launch.errors import UserError

    out = Path(args.out)
    if out.suffix.lower() not in (".parquet", ".pq", ".parq"):
        raise UserError(f"--out {out}: svdfill synth writes Parquet; give a name ending in .parquet")
    cfg = load_config(args.config)
    cfg = apply_overrides(cfg, {f"data.synthetic.{key}": getattr(args, flag)
                                for flag, (key, _, _) in _OVERRIDES.items()})
    s = cfg.data.synthetic
    if s.noise < 0 or s.zipf < 0 or s.user_skew < 0 or s.rank < 1:
        raise UserError("--noise, --zipf and --user-skew must be ≥ 0 and --rank ≥ 1")
    if s.n_ratings > s.n_users * s.n_items:
        raise UserError(f"--ratings {s.n_ratings:,} exceeds users × items = {s.n_users * s.n_items:,}")
    progress = not args.quiet and sys.stderr.isatty()
    info = write_parquet(s, out, progress=progress, overwrite=args.overwrite)
    rate = info["n_ratings"] / max(info["seconds"], 1e-9)
    print(f"wrote {info['n_ratings']:,} ratings ({info['n_users']:,} users × {info['n_items']:,} items, "
          f"rank {s.rank}, noise σ={s.noise:g}, seed {s.seed}) to {out} in {info['seconds']:.1f} s "
          f"({rate / 1e6:.1f}M ratings/s)")
    return 0
