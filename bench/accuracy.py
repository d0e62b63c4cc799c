"""`svdfill bench accuracy`: svdfill's default config vs the original recipe vs Surprise SVD
(and Spark MLlib ALS with ``--peer spark``), on the same seeded 90/10 splits, in one run.

Protocol (printed with the table):

* For each seed s, :func:`svdfill.data.split.split` (random, 10%, seed s) gives the training
  90% and the held-out 10% *test* split. Every RMSE/MAE in the table is on that test split.
* No method ever sees the test split while training or selecting. When a config early-stops
  (``train.patience > 0``) or refits, the validation fold it needs is carved out of the
  training 90% (another seeded random split, ``data.val_fraction`` of it); a config with
  ``patience = 0`` and no refit trains for its fixed epoch count — chosen beforehand by
  tuning on such validation folds (see the comment block of ``configs/ml-*.toml``) — on
  the whole training 90%.
* Surprise's ``SVD`` gets the exact same training triples (``Dataset.load_from_df`` +
  ``build_full_trainset``) and is tested on the same held-out list; once with its defaults
  and once with ``n_factors``/``n_epochs`` matched to svdfill's default config.
* With ``--peer spark``, Spark MLlib's ALS (:mod:`svdfill.bench.peer_spark`, a local Spark
  on all cores) gets the same triples too: once with its defaults (rank 10, maxIter 10,
  regParam 0.1) and once with the rank matched to svdfill's config; test pairs it cannot
  score (cold) get the training mean, as Surprise does.
* Predictions of every method are clipped to the training ratings' range, as Surprise does.
* Fit seconds: wall time of training only (data loading and splitting excluded), including
  svdfill's per-epoch metric passes. The ratio column is fit time ÷ Surprise SVD (defaults)
  fit time of the same seed, then averaged.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

PRESETS = {"ml-100k": "ml-100k", "ml-1m": "ml-1m"}
ORIGINAL_RECIPE = "original-recipe"
INNER_SEED_OFFSET = 1_000_003
"""The validation fold of seed s is split with seed ``s + INNER_SEED_OFFSET``."""
QUICK_RATINGS = 4000
QUICK_EPOCHS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="ml-100k",
                        help="ml-100k | ml-1m (the built-in configs and their data paths) or a "
                             "ratings file PATH (trained with the ml-100k defaults)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split seeds (default 0,1,2)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: a seeded {QUICK_RATINGS}-rating sample and at most "
                             f"{QUICK_EPOCHS} epochs per svdfill method (figures mean nothing)")
    parser.add_argument("--config", default=None,
                        help="svdfill config to benchmark instead of the dataset's default")
    parser.add_argument("--baseline-config", default=ORIGINAL_RECIPE,
                        help="the in-house baseline (default: the original recipe)")
    parser.add_argument("--ratings", default=None, help="override the data file of the configs")
    parser.add_argument("--dedupe", choices=["error", "last", "mean"], default=None,
                        help="duplicate (user, item) pairs in the file: error (default) | keep the "
                             "last | their mean (FilmTrust has 3)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the config's)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for svdfill (0 = torch's default); Surprise "
                             "always runs on one")
    parser.add_argument("--no-surprise", action="store_true", help="skip the Surprise rows")
    parser.add_argument("--peer", action="append", choices=["spark"], default=[],
                        help="also fit Spark MLlib ALS on the same splits (local Spark, all cores)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every per-seed figure and the table as JSON here")
    parser.add_argument("--quiet", action="store_true", help="only the final table")


# -- helpers ---------------------------------------------------------------------------------

def _parse_seeds(text: str) -> list[int]:
    from svdfill.errors import UserError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UserError("--seeds: no seed given")
    return seeds


def _configs(args) -> tuple[object, object, str]:
    """(svdfill config, baseline config, dataset label). The baseline reads the same data
    section (file, format, scale, validation fraction) as the svdfill config."""
    import dataclasses

    from svdfill.config import apply_overrides, load_config

    data = args.data
    if data in PRESETS:
        default_name, label, ratings_path = PRESETS[data], data, args.ratings
    else:
        default_name, label, ratings_path = PRESETS["ml-100k"], Path(data).name, args.ratings or data
    cfg = load_config(args.config or default_name)
    over: dict = {}
    if ratings_path is not None:
        over.update({"data.path": str(ratings_path), "data.format": "auto"})
        if data not in PRESETS:
            over.update({"data.scale_min": math.nan, "data.scale_max": math.nan})
    if args.device:
        over["train.device"] = args.device
    if getattr(args, "dedupe", None):
        over["data.dedupe"] = args.dedupe
    if args.quick:
        over["train.epochs"] = min(cfg.train.epochs, QUICK_EPOCHS)
    cfg = apply_overrides(cfg, over, "bench accuracy")
    if args.config is not None or ratings_path is not None:
        # the table names the data it ran on: the file a config or --ratings points at,
        # not the preset name of --data's default
        label = _data_label(cfg.data.path)
    base = load_config(args.baseline_config)
    base = dataclasses.replace(base, data=cfg.data)
    base_over: dict = {}
    if args.device:
        base_over["train.device"] = args.device
    if args.quick:
        base_over["train.epochs"] = min(base.train.epochs, QUICK_EPOCHS)
    base = apply_overrides(base, base_over, "bench accuracy")
    return cfg, base, label


def _data_label(path: str) -> str:
    """How the table's title names a data path: the file (or folder) name, with its parent
    folder when the name alone says little (``ml-100k/u.data``); "synthetic" for no path."""
    if not path:
        return "synthetic"
    p = Path(str(path).split("?", 1)[0].rstrip("/"))
    return f"{p.parent.name}/{p.name}" if p.parent.name not in ("", ".") else p.name


def _load(cfg, quick: bool):
    from svdfill.data.dataset import load_dataset

    ratings, _ = load_dataset(cfg.data)
    if quick and len(ratings) > QUICK_RATINGS:
        import numpy as np
        import torch

        keep = np.sort(np.random.default_rng(12345).choice(len(ratings), QUICK_RATINGS, replace=False))
        ratings = ratings.subset(torch.from_numpy(keep))
    return ratings


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _metrics(pred, target) -> dict:
    from svdfill.kernels.metrics import rating_metrics

    return rating_metrics(pred, target)


# -- the methods -----------------------------------------------------------------------------

def run_svdfill(cfg, train, test, seed: int, lo: float, hi: float) -> dict:
    """Train ``cfg`` with the trainer's public :func:`fit` on ``train`` only and score
    ``test``. Early stopping/refit (when the config asks for them) use a validation fold
    carved out of ``train``; the test split is never seen before scoring."""
    import torch

    from svdfill.config import apply_overrides
    from svdfill.data.split import split
    from svdfill.kernels.model import BiasedMF
    from svdfill.train import fit

    cfg = apply_overrides(cfg, {"train.seed": seed, "data.split_seed": seed}, "bench accuracy")
    needs_val = cfg.train.patience > 0 or cfg.train.refit
    if needs_val:
        fit_train, fit_val = split(train, how="random", fraction=cfg.data.val_fraction,
                                   seed=seed + INNER_SEED_OFFSET)
        protocol = f"early stop on a {cfg.data.val_fraction:.0%} fold of train" + (
            ", refit on train" if cfg.train.refit else "")
    else:
        fit_train, fit_val = train, None
        protocol = f"fixed {cfg.train.epochs} epochs on train"
    t0 = time.perf_counter()
    res = fit(cfg, fit_train, fit_val, quiet=True)
    seconds = time.perf_counter() - t0
    model = BiasedMF.from_state(res.state)
    with torch.no_grad():
        pred = model.predict(test.users, test.items).clamp_(lo, hi)
    s = res.summary
    epochs = s["refit"]["epochs"] if s.get("refit") else (s["best_epoch"] if needs_val else s["epochs_run"])
    return {**_metrics(pred, test.ratings), "fit_seconds": seconds, "epochs": int(epochs),
            "protocol": protocol, "inner_val_rmse": s["val_rmse"] if needs_val else None}


def surprise_available() -> str | None:
    """None when scikit-surprise imports, else why not."""
    try:
        import pandas
        import surprise
        del pandas, surprise  # importable is all this asks
    except ImportError as e:
        return f"{e.name or e} not installed (pip install 'svdfill[bench]')"
    return None


def run_surprise(train, test, seed: int, lo: float, hi: float, **kwargs) -> dict:
    """Surprise ``SVD(random_state=seed, **kwargs)`` fit on exactly ``train``'s triples and
    tested on ``test``'s (ids are svdfill's contiguous ids: the same pairs either way)."""
    import pandas as pd
    import torch
    from surprise import SVD, Dataset, Reader

    df = pd.DataFrame({"user": train.users.cpu().numpy(), "item": train.items.cpu().numpy(),
                       "rating": train.ratings.cpu().numpy().astype("float64")})
    trainset = Dataset.load_from_df(df, Reader(rating_scale=(lo, hi))).build_full_trainset()
    algo = SVD(random_state=seed, **kwargs)
    t0 = time.perf_counter()
    algo.fit(trainset)
    seconds = time.perf_counter() - t0
    testset = list(zip(test.users.tolist(), test.items.tolist(), test.ratings.tolist()))
    pred = torch.tensor([p.est for p in algo.test(testset)], dtype=torch.float64)
    return {**_metrics(pred, test.ratings), "fit_seconds": seconds,
            "epochs": int(kwargs.get("n_epochs", 20)), "protocol": "fixed epochs on train"}


def run_spark(spark, train, test, seed: int, lo: float, hi: float, *, rank: int) -> dict:
    """Spark MLlib ALS (maxIter 10, regParam 0.1, ``rank``) on exactly ``train``'s triples,
    scored on ``test``'s."""
    import torch

    from svdfill.bench.peer_spark import fit_als

    res = fit_als(spark, train, test, lo, hi, rank=rank, max_iter=10, reg=0.1, seed=seed)
    pred = torch.from_numpy(res["predictions"])
    protocol = "fixed 10 iterations on train" + (f"; {res['cold']} cold test pairs → mean" if res["cold"] else "")
    return {**_metrics(pred, test.ratings), "fit_seconds": res["fit_seconds"], "epochs": 10,
            "protocol": protocol}


# -- the run -----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    import torch

    from svdfill.data.split import split
    from svdfill.errors import UserError

    seeds = _parse_seeds(args.seeds)
    if args.threads < 0:
        raise UserError(f"--threads: expected >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, base, label = _configs(args)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    ratings = _load(cfg, args.quick)
    if len(ratings) < 20:
        raise UserError(f"{cfg.data.path}: {len(ratings)} ratings are too few to benchmark")
    lo, hi = float(ratings.ratings.min()), float(ratings.ratings.max())
    why_no_surprise = "--no-surprise" if args.no_surprise else surprise_available()

    names = [f"svdfill ({_cfg_label(cfg)})", f"original recipe ({_cfg_label(base)})"]
    if why_no_surprise is None:
        names += ["Surprise SVD (defaults)",
                  f"Surprise SVD (n_factors={cfg.model.factors}, n_epochs matched)"]
    spark_runs: list[tuple[str, int]] = []  # (row name, rank)
    why_no_spark = None
    if "spark" in args.peer:
        from svdfill.bench.peer_spark import spark_available

        why_no_spark = spark_available()
        if why_no_spark is None:
            spark_runs = [("Spark ALS (defaults: rank 10, maxIter 10, regParam 0.1)", 10)]
            if cfg.model.factors != 10:
                spark_runs.append((f"Spark ALS (rank {cfg.model.factors}, maxIter 10, regParam 0.1)",
                                   cfg.model.factors))
    names += [name for name, _ in spark_runs]
    per_seed: dict[str, list[dict]] = {n: [] for n in names}
    log(f"bench accuracy: {label}, {len(ratings):,} ratings, seeds {seeds}"
        + (" (quick)" if args.quick else ""))
    from svdfill.bench.peer_spark import local_spark  # pyspark itself loads only if started

    with local_spark() if spark_runs else contextlib.nullcontext() as spark:
        if spark is not None:
            log(f"  Spark {spark.version} started in {spark.start_seconds:.1f} s (not timed)")
        for seed in seeds:
            train, test = split(ratings, how="random", fraction=0.1, seed=seed)
            res = run_svdfill(cfg, train, test, seed, lo, hi)
            per_seed[names[0]].append(res)
            log(f"  seed {seed}: {names[0]}: RMSE {res['rmse']:.4f} in {res['fit_seconds']:.2f} s")
            res_b = run_svdfill(base, train, test, seed, lo, hi)
            per_seed[names[1]].append(res_b)
            log(f"  seed {seed}: {names[1]}: RMSE {res_b['rmse']:.4f} in {res_b['fit_seconds']:.2f} s")
            if why_no_surprise is None:
                sd = run_surprise(train, test, seed, lo, hi)
                per_seed[names[2]].append(sd)
                log(f"  seed {seed}: {names[2]}: RMSE {sd['rmse']:.4f} in {sd['fit_seconds']:.2f} s")
                sm = run_surprise(train, test, seed, lo, hi, n_factors=cfg.model.factors,
                                  n_epochs=max(1, res["epochs"]))
                per_seed[names[3]].append(sm)
                log(f"  seed {seed}: {names[3]}: RMSE {sm['rmse']:.4f} in {sm['fit_seconds']:.2f} s")
            for name, rank in spark_runs:
                sp = run_spark(spark, train, test, seed, lo, hi, rank=rank)
                per_seed[name].append(sp)
                log(f"  seed {seed}: {name}: RMSE {sp['rmse']:.4f} in {sp['fit_seconds']:.2f} s")
            for rows in per_seed.values():
                if why_no_surprise is None:
                    rows[-1]["vs_surprise"] = rows[-1]["fit_seconds"] / per_seed[names[2]][-1]["fit_seconds"]

    table = summarize(per_seed)
    text = format_table(table, label=label, n=len(ratings), seeds=seeds, quick=args.quick,
                        why_no_surprise=why_no_surprise, device=cfg.train.device,
                        threads=torch.get_num_threads())
    if why_no_spark is not None:
        text += f"\n(Spark rows skipped: {why_no_spark})"
    print(text)
    if args.json is not None:
        from svdfill.checkpoint import save_json

        save_json(args.json, {"data": label, "n_ratings": len(ratings), "seeds": seeds,
                              "quick": args.quick, "surprise": why_no_surprise or "ran",
                              "spark": ("ran" if spark_runs else why_no_spark or "not asked"),
                              "table": table, "per_seed": per_seed, "text": text})
    return 0


def _cfg_label(cfg) -> str:
    t = cfg.train
    how = {"als": "ALS", "gibbs": "Bayesian MF, Gibbs"}.get(t.solver, t.optimizer)
    return f"{how}, d={cfg.model.factors}"


def summarize(per_seed: dict[str, list[dict]]) -> list[dict]:
    """One row per method: mean and sd over seeds of RMSE, MAE, fit seconds and the fit-time
    ratio to Surprise SVD (defaults)."""
    rows = []
    for name, runs in per_seed.items():
        if not runs:
            continue
        row = {"method": name, "seeds": len(runs), "protocol": runs[0]["protocol"],
               "epochs": [r["epochs"] for r in runs]}
        for key in ("rmse", "mae", "fit_seconds", "vs_surprise"):
            m, s = _mean_sd([r.get(key) for r in runs])
            row[key], row[f"{key}_sd"] = m, s
        rows.append(row)
    return rows


def format_table(rows: list[dict], *, label: str, n: int, seeds: list[int], quick: bool,
                 why_no_surprise: str | None, device: str, threads: int) -> str:
    head = (f"Accuracy on {label} ({n:,} ratings{', QUICK sample' if quick else ''}): held-out 10% "
            f"TEST split per seed (svdfill.data.split random, seeds {','.join(map(str, seeds))}); "
            f"early stopping/selection only on a validation fold carved from the training 90% "
            f"(or a fixed, pre-tuned epoch count); predictions clipped to the rating range. "
            f"Mean ± sd over {len(seeds)} seed(s); device {device}, {threads} torch threads.")
    cols = ["method", "RMSE", "MAE", "fit s", "fit ÷ Surprise", "epochs", "selection"]
    body = []
    for r in rows:
        ratio = "—" if not math.isfinite(r["vs_surprise"]) else f"{r['vs_surprise']:.2f}×"
        ep = sorted(set(r["epochs"]))
        body.append([r["method"], f"{r['rmse']:.4f} ± {r['rmse_sd']:.4f}", f"{r['mae']:.4f} ± {r['mae_sd']:.4f}",
                     f"{r['fit_seconds']:.2f} ± {r['fit_seconds_sd']:.2f}", ratio,
                     ",".join(map(str, ep)), r["protocol"]])
    widths = [max(len(c), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [head, "", line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    if why_no_surprise is not None:
        out.append(f"(Surprise rows skipped: {why_no_surprise})")
    return "\n".join(out)

