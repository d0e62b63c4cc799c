"""`svdfill bench export`: the partitioned fill export (``--out DIR/``, every worker writing
its own part) against the single-file export by one process, measured in the same run.

A synthetic model of one of ``svdfill bench fill``'s shapes (factors and seen sets made
in seconds) is saved as a run folder; then each row is a real ``svdfill fill`` command in
fresh processes — ``--out FILE.parquet`` (the baseline), ``--launcher torchrun --nproc W
--out DIR/`` for each item split (gloo on 127.0.0.1), and with ``--ray`` the Ray fill
(``python -m svdfill.launch.ray_job fill --num-actors W``, a local Ray started by the
command). Figures: wall time of the command (process start, model load, fill, write),
the export time the command reports, rows written per second of it, the ratio to the
single file, and whether ``pyarrow.dataset`` reads the folder back equal to the single file
row for row.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from svdfill.bench.fill import SHAPES

    parser.add_argument("--shape", choices=sorted(SHAPES), default="600k",
                        help="users, items, factors, k and seen pairs of bench fill's shape (default 600k)")
    parser.add_argument("--workers", default="2", help="comma-separated writer counts (default 2)")
    parser.add_argument("--item-split", default="replicate,shard",
                        help="comma-separated item splits of the torchrun rows (default both)")
    parser.add_argument("--ray", action="store_true",
                        help="also the Ray fill (a local Ray per row; its start-up is in the wall time)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="make the model and outputs here and keep them (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)


def make_run(folder: Path, shape: str, seed: int) -> tuple[Path, int]:
    """A run folder of a synthetic model of ``shape`` (model.pt + seen.pt); returns it and k."""
    from svdfill.bench.fill import SHAPES, synthetic_model, synthetic_seen
    from svdfill.checkpoint import save_model, save_seen
    from svdfill.config import Config
    from svdfill.data.idmap import IdMap

    import numpy as np

    U, I, d, k, nnz = SHAPES[shape]
    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    state = synthetic_model(U, I, d, seed)
    seen = synthetic_seen(U, I, nnz, seed + 1)
    save_model(run, {key: v.cpu() for key, v in state.items()}, IdMap(np.arange(U), np.arange(I)),
               Config(), {})
    save_seen(run, seen, seen)
    return run, k


_SUMMARY = re.compile(r"in ([0-9.]+) s on ")


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, the export seconds its summary line reports)."""
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    m = _SUMMARY.search(p.stdout + p.stderr)
    if m is None:
        raise RuntimeError(f"no summary line in the output of {' '.join(cmd)}:\n{p.stdout[-2000:]}")
    return wall, float(m.group(1))


def _same(folder: Path, ref) -> bool:
    import pyarrow.dataset as pads

    return pads.dataset(folder, format="parquet").to_table().equals(ref)


def main(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    workers = [int(x) for x in str(args.workers).split(",") if x.strip()]
    splits = [x.strip() for x in str(args.item_split).split(",") if x.strip()]
    tmp = None
    if args.keep:
        folder = Path(args.keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="svdfill-bench-export-")
        folder = Path(tmp.name)
    try:
        run, k = make_run(folder, args.shape, args.seed)
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
        fill = [sys.executable, "-m", "svdfill.launch.cli", "fill", "--model", str(run), "--k", str(k),
                "--device", "cpu"]
        single = folder / "single.parquet"
        single.unlink(missing_ok=True)
        base = _timed(fill + ["--out", str(single)], env)
        ref = pq.read_table(single)
        rows = [("one process, one file (baseline)", 1, *base, True)]
        for w in workers:
            for split in splits:
                out = folder / f"torchrun-{w}-{split}"
                got = _timed(fill + ["--out", f"{out}/", "--restart", "--launcher", "torchrun",
                                     "--nproc", str(w), "--item-split", split], env)
                rows.append((f"torchrun, a part per rank, items {split}", w, *got, _same(out, ref)))
            if args.ray:
                out = folder / f"ray-{w}"
                got = _timed([sys.executable, "-m", "svdfill.launch.ray_job", "fill", "--model", str(run),
                              "--k", str(k), "--device", "cpu", "--out", f"{out}/", "--restart",
                              "--num-actors", str(w)], env)
                rows.append(("Ray actors, a part per actor, items auto", w, *got, _same(out, ref)))
        n = ref.num_rows
        print(f"Fill export, shape {args.shape}: {n:,} rows (top-{k}), on {os.cpu_count()} CPU core(s)")
        print(f"{'how':44s} {'W':>2s} {'wall s':>7s} {'export s':>8s} {'rows/s':>11s} "
              f"{'x single':>8s} {'== single':>9s}")
        for name, w, wall, secs, same in rows:
            print(f"{name:44s} {w:2d} {wall:7.2f} {secs:8.2f} {n / secs:11,.0f} "
                  f"{base[1] / secs:8.2f} {'yes' if same else 'NO':>9s}")
        return 0 if all(r[-1] for r in rows) else 1
    finally:
        if tmp is not None:
            tmp.cleanup()
