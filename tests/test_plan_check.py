"""bench.plan_check (`svdfill bench plan`): the table of measured vs predicted, the grid
rows when the grid code is missing, and one real run through the command."""

from __future__ import annotations

import json

import pytest

from svdfill.bench import plan_check
from svdfill.plan.estimate import Problem, estimate
from svdfill.plan.profile import cpu_profile, save_profile

CPU = cpu_profile(cores=2, memory_bytes=16 * 2**30)
SPEC = {"users": 1200, "items": 300, "ratings": 20_000, "factors": 4, "sweeps": 1}


def _fake_runner(scale: float):
    """Ranks that 'measure' ``scale`` × what the planner predicts (no processes)."""
    def run(spec, W):
        p = Problem(spec["users"], spec["items"], spec["ratings"], spec["factors"], W,
                    solver=spec["solver"])
        e = estimate(p, CPU, spec["layout"])
        return [{"sent": e.sweep_bytes * scale, "peak": e.memory_total * scale,
                 "seconds": e.sweep_time["total"] * scale, "cpu_seconds": 1.0,
                 "calls": e.sweep_collectives} for _ in range(W)]
    return run


def test_rows_hold_measured_over_predicted():
    rows = plan_check.check_rows(SPEC, [1, 2], ["items", "grid"], ["als", "sgd"], CPU,
                                 runner=_fake_runner(1.25), log=lambda _: None)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["peak"] == pytest.approx(1.25 * r["peak_pred"])
        assert r["seconds"] == pytest.approx(1.25 * r["seconds_pred"])
        if r["W"] == 1:
            assert r["sent"] == r["sent_pred"] == 0
    text = plan_check.render(rows)
    assert "1.25" in text and "exact" in text
    assert len(text.splitlines()) == 2 + len(rows)


def test_grid_rows_say_when_the_grid_is_missing(monkeypatch):
    monkeypatch.setattr(plan_check, "grid_available", lambda solver="als": False)
    rows = plan_check.check_rows(SPEC, [2], ["items", "grid"], ["als"], CPU,
                                 runner=_fake_runner(1.0), log=lambda _: None)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == plan_check.GRID_MISSING
    assert plan_check.GRID_MISSING in plan_check.render(rows)


def test_grid_code_is_found_here():
    assert plan_check.grid_available("als") and plan_check.grid_available("sgd")


@pytest.mark.multiprocess
def test_bench_plan_command_runs(tmp_path, capsys):
    """`svdfill bench plan` end to end on a tiny job at W = 1 (one spawned process) with a
    profile file: the row is measured, its bytes exact, and the JSON written."""
    from svdfill.launch.cli import main

    prof = tmp_path / "p.json"
    save_profile(CPU, prof)
    out = tmp_path / "rows.json"
    argv = ["bench", "plan", "--workers", "1", "--solvers", "als", "--layouts", "items",
            "--users", "600", "--items", "150", "--ratings", "6000", "--factors", "4",
            "--sweeps", "1", "--profile", str(prof), "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "items  als     1" in text
    got = json.loads(out.read_text())
    (row,) = got["rows"]
    assert row["status"] == "ok" and row["sent"] == row["sent_pred"] == 0
    assert row["peak"] > 0 and row["seconds"] > 0


def test_bench_plan_rejects_bad_options(capsys):
    from svdfill.launch.cli import main

    assert main(["bench", "plan", "--workers", "0"]) == 2
    assert main(["bench", "plan", "--solvers", "newton"]) == 2
    assert "--solvers" in capsys.readouterr().err
