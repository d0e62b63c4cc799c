"""`svdfill bench fill|kernels|accuracy|ingest|export|plan`: each prints one table with its baseline measured
in the same run, so speed claims are ratios, never lone seconds."""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "fill": "Fill: per-pair DataLoader vs dense product vs fill_topk (and peers).",
    "kernels": "Fused Triton kernels vs plain torch vs the hardware floor (CUDA).",
    "accuracy": "svdfill vs the original recipe vs Surprise SVD on seeded splits.",
    "ingest": "Reading a dataset: each of W ranks its share vs one process reading all.",
    "export": "The fill export: W workers writing their own parts vs one process writing one file.",
    "plan": "svdfill plan's predicted bytes, memory and time vs measured runs at W = 1, 2, 4.",
}

_MODULES = {"plan": "plan_check"}
"""Suites whose module under svdfill.bench is not named after the suite."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    sub.required = True
    for name, help_ in SUITES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"svdfill.bench.{_MODULES.get(name, name)}").add_arguments(p)


def main(args: argparse.Namespace) -> int:
    if args.suite == "fill":  # a wrong --device is the user's error, said as such
        from svdfill.launch.cmd_fill import resolve_device

        args.device = str(resolve_device(args.device))
    return importlib.import_module(f"svdfill.bench.{_MODULES.get(args.suite, args.suite)}").main(args)
