"""The `svdfill` console script: one subcommand per module ``launch/cmd_<name>.py``.

Each command module exposes ``add_arguments(parser)`` and ``main(args) -> int``, and
imports nothing heavy at module level (torch, pyarrow, ray, triton go inside ``main``),
so ``svdfill --help`` is instant and a missing optional dependency of one command
never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": "Train on a config, then fill the top-k to Parquet (the main job).",
    "train": "Train biased MF on a ratings file (or the synthetic preset).",
    "eval": "RMSE/MAE of a trained model on a ratings file (and ranking metrics with --topk).",
    "fill": "Score every unseen (user, item) pair and export each user's top-k as Parquet.",
    "synth": "Write a planted low-rank synthetic ratings file (Parquet).",
    "bench": "Benchmarks that print a table with a baseline measured in the same run.",
    "similar": "Each item's top-k most similar items (cosine or dot of the factors) as Parquet.",
    "export-factors": "Write the user/item factors and biases as Parquet (or a Spark ALSModel).",
    "foldin": "Fold new or changed users into a trained model (items fixed) and write a new run.",
    "plan": "Per-rank memory, bytes moved and time of a job, items vs grid layout (a prediction).",
}


def _load(name: str):
    return importlib.import_module(f"svdfill.launch.cmd_{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdfill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_ in COMMANDS.items():
        _load(name).add_arguments(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from svdfill.launch.errors import run_reporting_errors

    return run_reporting_errors(lambda: _load(args.command).main(args))


if __name__ == "__main__":
    sys.exit(main())
