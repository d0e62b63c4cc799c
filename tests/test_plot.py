"""train/plot.py: the learning-curve PNG beside metrics.jsonl (matplotlib optional)."""

from __future__ import annotations

import json
import sys

import pytest

from svdfill.train.plot import read_metrics, write_learning_curve


def _write_metrics(run_dir, rows):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows():
    rows = []
    for e in range(1, 8):
        rows.append({"phase": "select", "epoch": e, "lr": 0.01, "train_rmse": 1.0 - 0.05 * e,
                     "val_rmse": 0.95 - 0.01 * e + 0.004 * max(0, e - 4) ** 2, "seconds": 0.1})
    for e in range(1, 5):
        rows.append({"phase": "refit", "epoch": e, "lr": 0.01, "train_rmse": 0.98 - 0.05 * e,
                     "val_rmse": None, "seconds": 0.1})
    return rows


def test_writes_png_beside_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path, _rows())
    out = write_learning_curve(tmp_path)
    assert out == tmp_path / "learning_curve.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_real_training_run_gets_a_curve(tmp_path):
    """A real `run_training` on a small synthetic config leaves a PNG in the run folder."""
    pytest.importorskip("matplotlib")
    from svdfill.config import apply_overrides, load_config
    from svdfill.train import run_training

    cfg = apply_overrides(load_config(None), {
        "data.synthetic.n_users": 200, "data.synthetic.n_items": 100,
        "data.synthetic.n_ratings": 5000, "model.factors": 4, "train.epochs": 3,
        "train.solver": "als", "train.patience": 0,
    })
    run_training(cfg, tmp_path / "run", quiet=True)
    png = tmp_path / "run" / "learning_curve.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_plot_returns_none(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_learning_curve(tmp_path) is None  # no metrics.jsonl
    _write_metrics(tmp_path, [{"phase": "select", "epoch": 1, "train_rmse": None, "val_rmse": None}])
    assert write_learning_curve(tmp_path) is None
    assert not (tmp_path / "learning_curve.png").exists()


def test_without_matplotlib_returns_none_quietly(tmp_path, monkeypatch, capsys):
    _write_metrics(tmp_path, _rows())
    # a None entry in sys.modules makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_learning_curve(tmp_path) is None
    assert not (tmp_path / "learning_curve.png").exists()
    assert capsys.readouterr() == ("", "")


def test_bad_metrics_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_rmse": 1.0}\n{not json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
