"""`svdfill bench fill|kernels|accuracy`: each prints one table with its baseline measured
in the same run, so speed claims are ratios, never lone seconds."""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "fill": "Fill: per-pair DataLoader vs dense product vs fill_topk (and peers).",
    "kernels": "Fused Triton kernels vs plain torch vs the hardware floor (CUDA).",
    "accuracy": "svdfill vs the original recipe vs Surprise SVD on seeded splits.",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    sub.required = True
    for name, help_ in SUITES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"svdfill.launch.bench_{name}").add_arguments(p)


def main(args: argparse.Namespace) -> int:
    return importlib.import_module(f"svdfill.launch.bench_{args.suite}").main(args)
