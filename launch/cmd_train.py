"""`svdfill train`: train biased MF on a config's ratings into a run directory.

``--launcher torchrun --nproc N`` reruns the same command as a one-machine torchrun job
(``python -m torch.distributed.run --standalone --nproc_per_node=N -m
svdfill.launch.torchrun_train …``; see :mod:`svdfill.launch.launcher`).
"""

from __future__ import annotations

import argparse

from svdfill.launch.launcher import add_launcher_arguments, launch_torchrun, launcher_nproc

TORCHRUN_MODULE = "svdfill.launch.torchrun_train"


def add_arguments(parser: argparse.ArgumentParser, *, launcher: bool = True) -> None:
    """The options of ``svdfill train``; ``launcher=False`` leaves out ``--launcher`` and
    ``--nproc`` (for entry points that already are one rank of a distributed job)."""
    parser.add_argument("--config", required=True,
                        help="TOML config file, or a built-in preset name (e.g. demo, ml-100k)")
    parser.add_argument("--out", required=True, help="run directory to create (runs/NAME)")
    parser.add_argument("--ratings", help="ratings file; overrides data.path")
    parser.add_argument("--dedupe", choices=["error", "last", "mean"],
                        help="duplicate (user, item) pairs: error (default) | keep the last | "
                             "average; overrides data.dedupe")
    parser.add_argument("--seed", type=int, help="training seed; overrides train.seed")
    parser.add_argument("--device", help="cpu | cuda | cuda:N; overrides train.device")
    parser.add_argument("--epochs", type=int, help="maximum epochs; overrides train.epochs")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no per-epoch lines")
    if launcher:
        add_launcher_arguments(parser, TORCHRUN_MODULE)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted config overrides of the command-line options that were given."""
    return {"data.path": getattr(args, "ratings", None), "data.dedupe": getattr(args, "dedupe", None),
            "train.seed": getattr(args, "seed", None),
            "train.device": getattr(args, "device", None), "train.epochs": getattr(args, "epochs", None)}


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

    from svdfill.config import apply_overrides, load_config

    nproc = launcher_nproc(args)
    if nproc is not None:
        apply_overrides(load_config(args.config), overrides_from_args(args))  # config errors: one line, here
        return launch_torchrun(TORCHRUN_MODULE, args, add_arguments, nproc)
    from svdfill.train import run_training

    cfg = apply_overrides(load_config(args.config), overrides_from_args(args))
    check_device(cfg.train.device)
    summary = run_training(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet)
    keys = ("val_rmse", "val_mae", "val_mse", "best_epoch", "epochs_run", "train_seconds",
            "n_train", "n_val", "n_val_cold")
    print(json.dumps({k: summary.get(k) for k in keys} | {"run_dir": str(args.out)}))
    return 0
