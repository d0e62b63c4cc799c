"""`svdfill export-factors`: a trained model's user and item tables for other tools.

``--format parquet`` (default): ``DIR/users.parquet``, ``DIR/items.parquet`` (raw id,
bias float32, factors fixed_size_list<float32>[d]) and ``DIR/model.json`` (μ, d, sizes,
source model hash), readable without torch. ``--format spark``: the folder Spark's
``ALSModel.load`` reads, with μ and the biases folded into two extra factor columns so
Spark predicts what svdfill predicts. Details: :mod:`svdfill.data.factors`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory of a trained model (runs/NAME) or its model.pt")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--format", choices=["parquet", "spark"], default="parquet",
                        help="parquet: users/items Parquet + model.json (default); "
                             "spark: an ALSModel folder for pyspark.ml.recommendation.ALSModel.load")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="no summary line")


def main(args: argparse.Namespace) -> int:
    from svdfill.checkpoint import load_model
    from svdfill.data.factors import export_factors
    from svdfill.launch.cmd_fill import file_sha256

    model = load_model(args.model)
    out = export_factors(model.state, model.idmap, args.out, format=args.format,
                         overwrite=args.overwrite,
                         info={"model_sha256": file_sha256(model.path), "model": str(model.path.resolve())})
    if not args.quiet:
        d = int(model.state["user_factors"].shape[1])
        print(f"svdfill: exported {model.n_users:,} users and {model.n_items:,} items "
              f"(d = {d}) as {args.format} to {out}")
    return 0
