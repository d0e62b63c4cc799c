"""`svdfill eval`: RMSE/MAE/MSE of a trained model on a ratings file.

Raw ids in the file are encoded with the model's id map. A pair whose user (or item) the
model has never seen is still predicted, from what is known — μ plus the known item (user)
bias, or μ alone — and counted in ``n_cold_users`` / ``n_cold_items``, never dropped and
never NaN.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run directory of a trained model (runs/NAME)")
    parser.add_argument("--ratings", required=True, help="ratings file to score")
    add_model_data_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--quiet", action="store_true", help="print only the JSON result")
    parser.add_argument("--topk", type=int, default=None, metavar="K",
                        help="also Precision@K, Recall@K and NDCG@K of each user's top-K unseen items "
                             "against the held-out ratings >= --relevant (training items excluded)")
    parser.add_argument("--relevant", type=float, default=4.0,
                        help="a held-out rating at least this is relevant for --topk (default 4)")


def predict_raw(model, users_raw, items_raw, *, device="cpu", chunk: int = 1 << 22):
    """Predictions for raw ids with a :class:`~svdfill.checkpoint.LoadedModel`.

    Returns ``(pred float32 tensor [n], cold_user bool [n], cold_item bool [n])``: unknown
    users contribute no factor and no bias, unknown items likewise (μ + known bias)."""
    import numpy as np
    import torch

    uc = torch.from_numpy(np.asarray(model.idmap.encode_users(users_raw), dtype=np.int64))
    ic = torch.from_numpy(np.asarray(model.idmap.encode_items(items_raw), dtype=np.int64))
    st = {k: v.to(device) for k, v in model.state.items()}
    out = torch.empty(uc.shape[0], dtype=torch.float32)
    for s in range(0, uc.shape[0], chunk):
        u = uc[s:s + chunk].to(device)
        i = ic[s:s + chunk].to(device)
        ku, ki = u >= 0, i >= 0
        u0, i0 = u.clamp(min=0), i.clamp(min=0)
        p = st["user_factors"][u0] * ku.unsqueeze(1)
        q = st["item_factors"][i0] * ki.unsqueeze(1)
        pred = (st["global_mean"] + torch.where(ku, st["user_bias"][u0], 0.0)
                + torch.where(ki, st["item_bias"][i0], 0.0) + (p * q).sum(1))
        out[s:s + chunk] = pred.cpu()
    return out, uc < 0, ic < 0


def evaluate(model, raw, *, device="cpu") -> dict:
    """``{"rmse","mae","mse","n","n_cold_users","n_cold_items"}`` of ``model`` on ``raw``
    (:class:`~svdfill.data.readers.RawRatings`)."""
    import torch

    from svdfill.kernels.metrics import rating_metrics

    pred, cu, ci = predict_raw(model, raw.users, raw.items, device=device)
    m = rating_metrics(pred, torch.as_tensor(raw.ratings, dtype=torch.float32))
    return {"rmse": m["rmse"], "mae": m["mae"], "mse": m["mse"], "n": int(pred.shape[0]),
            "n_cold_users": int(cu.sum()), "n_cold_items": int(ci.sum())}


def read_for_model(model, path: str, *, format: str | None = None, dedupe: str | None = None,
                   sep: str | None = None, user_col: str | None = None, item_col: str | None = None,
                   rating_col: str | None = None, scale: tuple[float, float] | None = None):
    """Read ``path`` with the model's data settings (columns, separator, scale) unless told."""
    import math

    from svdfill.data.readers import read_ratings

    d = model.config.data
    lo, hi = float(d.scale_min), float(d.scale_max)
    if scale is None:
        scale = "auto" if math.isnan(lo) and math.isnan(hi) else (lo, hi)
    if sep is None:
        sep = d.sep if format in (None, d.format) else ""
    return read_ratings(path, format=format or "auto", sep=sep,
                        user_col=user_col or d.user_col, item_col=item_col or d.item_col,
                        rating_col=rating_col or d.rating_col, scale=scale, dedupe=dedupe or d.dedupe)


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`read_with_options` reads a file for a trained model with: its
    format, the data options of ``svdfill train`` and ``--dedupe`` (defaults: the model's)."""
    from svdfill.launch.cmd_train import add_data_arguments

    parser.add_argument("--format", default=None,
                        help="ratings format (auto | ml-100k | ml-dat | csv | parquet); default: "
                             "auto, with the model's column names and separator")
    add_data_arguments(parser, format=False)
    parser.add_argument("--dedupe", default=None, choices=("error", "last", "mean"),
                        help="duplicate (user, item) pairs in the file (default: the model's data.dedupe)")


def read_with_options(model, args: argparse.Namespace):
    """:func:`read_for_model` of ``args.ratings`` with the data options of
    ``cmd_train.add_data_arguments`` (``--format``, ``--sep``, ``--user-col``, …)."""
    from svdfill.launch.cmd_train import parse_scale, parse_sep

    return read_for_model(model, args.ratings, format=args.format, dedupe=args.dedupe,
                          sep=parse_sep(args.sep), user_col=args.user_col, item_col=args.item_col,
                          rating_col=args.rating_col, scale=parse_scale(args.scale))


def main(args: argparse.Namespace) -> int:
    import json
    import sys

    from svdfill.checkpoint import load_model
    from svdfill.launch.cmd_train import check_device

    check_device(args.device)
    model = load_model(args.model)
    raw = read_with_options(model, args)
    result = evaluate(model, raw, device=args.device)
    if args.topk is not None:  # ranking metrics (svdfill.kernels.ranking, owned by the fill)
        from svdfill.checkpoint import load_seen
        from svdfill.kernels.ranking import ranking_for_model
        from svdfill.launch.errors import UserError

        if args.topk < 1:
            raise UserError(f"--topk must be at least 1, got {args.topk}")
        result.update(ranking_for_model(model, raw, args.topk, seen=load_seen(model.path.parent)["train"],
                                        threshold=args.relevant, device=args.device))
    if not args.quiet and (result["n_cold_users"] or result["n_cold_items"]):
        print(f"note: {result['n_cold_users']} pairs with a user and {result['n_cold_items']} with an "
              "item unknown to the model were predicted from the global mean and known biases",
              file=sys.stderr)
    print(json.dumps(result))
    return 0
