"""Learning-curve PNG (train/validation RMSE per epoch) beside a run's ``metrics.jsonl``.

matplotlib is an optional extra (``pip install svdfill[plot]``): without it
:func:`write_learning_curve` returns ``None`` and training goes on as if nothing happened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

PNG_NAME = "learning_curve.png"
METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped).

    Raises ``ValueError`` naming the file and line of a line that is not a JSON object.
    """
    rows = []
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and isinstance(r.get("epoch"), (int, float)):
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def write_learning_curve(run_dir: str | os.PathLike) -> Path | None:
    """Write ``run_dir/learning_curve.png`` from ``run_dir/metrics.jsonl``.

    One line per phase and split: ``train_rmse`` and ``val_rmse`` of the selection phase
    (marking the best validation epoch), and ``train_rmse`` of a refit on train+validation
    when the run had one. Returns the PNG's path, or ``None`` when matplotlib is not
    installed, the metrics file is missing, or it holds no RMSE to plot. The PNG is
    written to a temporary name in the same folder and renamed (atomic).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_NAME
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not metrics.exists():
        return None
    rows = read_metrics(metrics)
    phases: dict[str, list[dict]] = {}
    for r in rows:
        phases.setdefault(str(r.get("phase", "select")), []).append(r)

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    plotted = False
    styles = {"select": "-", "refit": "--"}
    for phase, prow in phases.items():
        style = styles.get(phase, ":")
        label_phase = "" if phase == "select" else f" ({phase})"
        for key, color, name in (("train_rmse", "tab:blue", "train"), ("val_rmse", "tab:orange", "validation")):
            xs, ys = _series(prow, key)
            if not xs:
                continue
            ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 40 else None,
                    markersize=3, label=f"{name}{label_phase}")
            plotted = True
            if key == "val_rmse" and phase == "select":
                j = min(range(len(ys)), key=ys.__getitem__)
                ax.annotate(f"best {ys[j]:.4f} @ {xs[j]:g}", (xs[j], ys[j]), textcoords="offset points",
                            xytext=(0, 10), ha="center", fontsize=8, color=color)
    if not plotted:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("RMSE")
    ax.set_title(f"{run_dir.name}: RMSE per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    out = run_dir / PNG_NAME
    tmp = run_dir / f".{PNG_NAME}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
