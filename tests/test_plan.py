"""svdfill.plan: the estimators against bytes and tensors counted on real tiny runs, the
popularity model against the synthetic generator, the profile, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from svdfill.plan.estimate import (Problem, allreduce_sent, cpu_seconds, estimate,
                                   expected_distinct, grid_needed_rows, render)
from svdfill.plan.profile import (DeviceProfile, calibrate, cpu_profile, h100_profile,
                                  load_profile, save_profile)

CPU = cpu_profile(cores=2, memory_bytes=16 * 2**30)


# -- the popularity model ----------------------------------------------------------------------------

def _brute_distinct(n: int, draws: int, exponent: float) -> float:
    """float64 reference: Σ_j 1 − (1 − w_j)^draws with w ∝ j^-exponent, term by term."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    w /= w.sum()
    return float(sum(1.0 - (1.0 - x) ** draws for x in w))


@pytest.mark.parametrize("n, draws, s", [(1, 5, 0.8), (7, 3, 0.0), (1000, 250, 0.8),
                                         (1237, 10_000, 1.3), (500, 1, 0.5)])
def test_expected_distinct_matches_the_sum(n, draws, s):
    assert expected_distinct(n, draws, s) == pytest.approx(_brute_distinct(n, draws, s), rel=1e-9)


def test_expected_distinct_limits():
    assert expected_distinct(100, 0, 0.8) == 0.0
    assert expected_distinct(100, 10**9, 0.8) == pytest.approx(100, rel=1e-6)
    few = expected_distinct(10_000, 50, 0.8)
    assert 45 < few <= 50  # few draws: almost all distinct


def test_grid_needed_rows_against_synthetic_data():
    """The user half-sweep's needed-not-owned items, counted on data.synth's ratings cut into
    a real grid layout, vs the popularity model: within 10% on average over the ranks."""
    from svdfill.config import SynthConfig
    from svdfill.data.synth import generate
    from svdfill.distributed.grid import GridLayout, grid_bounds

    U, I, R = 6000, 1500, 120_000
    raw = generate(SynthConfig(n_users=U, n_items=I, n_ratings=R, seed=3))
    users, items = torch.from_numpy(raw.users), torch.from_numpy(raw.items)
    for W in (2, 4):
        lay = GridLayout(U, I, grid_bounds(U, W, torch.bincount(users, minlength=U)),
                         grid_bounds(I, W, torch.bincount(items, minlength=I)))
        uo, io = lay.user_owner(users), lay.item_owner(items)
        need_i = [int(torch.unique(items[(uo == r) & (io != r)]).numel()) for r in range(W)]
        need_u = [int(torch.unique(users[(io == r) & (uo != r)]).numel()) for r in range(W)]
        pi, pu = grid_needed_rows(Problem(U, I, R, 8, W))
        assert np.mean(need_i) == pytest.approx(pi, rel=0.10)
        assert np.mean(need_u) == pytest.approx(pu, rel=0.10)


# -- byte models against counted runs --------------------------------------------------------------

def _rank_runs(rank, W, spec):
    """On one rank of a W-process group: each layout's runs of both solvers (bench.plan_check's
    counted runs), and the tensors an items-layout rank holds."""
    from svdfill.bench.plan_check import _data, _run_grid, _run_items
    from svdfill.distributed.world import DistWorld

    users, items, ratings = _data(spec)
    world = DistWorld(rank, W, torch.device("cpu"), "gloo")
    out = {}
    for layout, run in (("items", _run_items), ("grid", _run_grid)):
        for solver in ("als", "sgd"):
            out[layout, solver] = run(world, dict(spec, layout=layout, solver=solver), users,
                                      items, ratings)
    out["tensors"] = _tensors(rank, W, spec, users, items, ratings)
    return out


def _tensors(rank, W, spec, users, items, ratings):
    """The bytes of the tensors a real items-layout SGD rank holds, by planner part."""
    from svdfill.bench.plan_check import _config
    from svdfill.data.dataset import Ratings
    from svdfill.distributed.sharding import balanced_shards, item_counts
    from svdfill.distributed.world import DistWorld
    from svdfill.train.factory import make_solver
    from svdfill.train.shard import TrainShard

    U, I = spec["users"], spec["items"]
    shards = balanced_shards(item_counts(items, I), W)
    lo, hi = shards[rank]
    world = DistWorld(rank, W, torch.device("cpu"), "gloo").with_shards(shards)
    keep = (items >= lo) & (items < hi)
    local = Ratings(users[keep].clone(), (items[keep] - lo).to(torch.int32), ratings[keep].clone(), U, hi - lo)
    shard = TrainShard.build(world, local, I, lo, hi)
    solver = make_solver(_config(dict(spec, solver="sgd")), world, shard)
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    m, d = solver.model, shard.ratings
    return {"user": nb(m.user_factors, m.user_bias), "item": nb(m.item_factors, m.item_bias),
            "ratings": nb(local.users, local.items, local.ratings, d.users, d.items),
            "counts": nb(shard.user_counts, shard.item_counts), "n": len(local),
            "items_local": hi - lo}


SPEC = {"users": 3000, "items": 800, "ratings": 60_000, "factors": 6, "sweeps": 1,
        "batch_size": 4096}


@pytest.fixture(scope="module")
def counted_runs():
    """One W = 2 gloo job running every counted run (spawning processes is the slow part)."""
    from multiprocess_harness import run_ranks

    return run_ranks(_rank_runs, 2, SPEC, timeout=300)


def _problem(solver: str) -> Problem:
    return Problem(SPEC["users"], SPEC["items"], SPEC["ratings"], SPEC["factors"], 2,
                   solver=solver, batch_size=SPEC["batch_size"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("solver", ["als", "sgd"])
def test_items_layout_bytes_are_what_the_all_reduces_carry(counted_runs, solver):
    """Every byte through World.all_reduce_sum in one sweep/epoch at W = 2 (ring convention),
    and the number of calls, equal the planner's items-layout prediction."""
    e = estimate(_problem(solver), CPU, "items")
    assert e.sweep_bytes > 0
    for r in counted_runs:
        got = r["items", solver]
        assert got["sent"] == pytest.approx(e.sweep_bytes, rel=1e-9)
        # the SGD epoch's prediction also counts the all-reduce that agrees on its steps
        assert got["calls"] == e.sweep_collectives - (1 if solver == "sgd" else 0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("solver", ["als", "sgd"])
def test_grid_layout_bytes(counted_runs, solver):
    """Grid ALS: the row exchanges' bytes within 10% of the popularity model (mean over
    ranks); DSGD: the ring's payload is exactly I·(d+1)·4 bytes per rank per epoch."""
    e = estimate(_problem(solver), CPU, "grid")
    runs = [r["grid", solver] for r in counted_runs]
    mean = sum(r["sent"] for r in runs) / len(runs)
    if solver == "als":
        assert mean == pytest.approx(e.sweep_bytes, rel=0.10)
    else:
        assert mean == e.sweep_bytes == SPEC["items"] * (SPEC["factors"] + 1) * 4
        assert runs[0]["calls"] == e.sweep_collectives


@pytest.mark.multiprocess
def test_items_layout_memory_parts_are_the_tensors_held(counted_runs):
    """Tables, ratings (host Ratings + int64 device copies; float32 shared on a CPU) and
    rating counts of a real W = 2 rank equal the planner's parts (its item shard's exact
    size: balanced shards differ from ⌈I/W⌉ by a few rows)."""
    e = estimate(_problem("sgd"), CPU, "items")
    k = SPEC["factors"] + 1
    per = [r["tensors"] for r in counted_runs]
    for r in per:
        assert r["user"] == e.memory["user table (all)"]
        assert r["item"] == r["items_local"] * k * 4
        assert r["ratings"] == r["n"] * 28
        assert r["counts"] == SPEC["users"] * 8 + r["items_local"] * 8
    assert sum(r["n"] for r in per) == SPEC["ratings"]
    assert e.memory["ratings"] == pytest.approx(SPEC["ratings"] / 2 * 28)
    assert e.memory["item table (shard)"] == math.ceil(SPEC["items"] / 2) * k * 4


# -- estimator arithmetic ---------------------------------------------------------------------------

def test_allreduce_convention():
    assert allreduce_sent(1000, 1) == 0
    assert allreduce_sent(1000, 2) == 1000
    assert allreduce_sent(1000, 4) == 1500


def test_items_als_bytes_formula():
    U, d, W = 10_000, 15, 4
    e = estimate(Problem(U, 500, 100_000, d, W), CPU, "items")
    k = d + 1
    assert e.sweep_bytes == pytest.approx(2 * (W - 1) / W * U * (k * k + k) * 4)
    rows = (1 << 24) // (k * k)
    assert e.sweep_collectives == 2 * math.ceil(U / rows)
    one = estimate(Problem(U, 500, 100_000, d, 1), CPU, "items")
    assert one.sweep_bytes == 0 and one.sweep_collectives == 0 and one.fill_bytes == 0


def test_grid_holds_a_wth_of_the_tables_and_moves_less():
    p = Problem(2_000_000, 200_000, 200_000_000, 64, 16)
    items, grid = estimate(p, h100_profile(), "items"), estimate(p, h100_profile(), "grid")
    k = 65
    assert items.memory["user table (all)"] == 2_000_000 * k * 4
    assert grid.memory["user table (block)"] == math.ceil(2_000_000 / 16) * k * 4
    assert grid.sweep_bytes < items.sweep_bytes
    assert grid.fill_bytes == pytest.approx(15 / 16 * 200_000 * k * 4)
    dsgd = estimate(Problem(2_000_000, 200_000, 200_000_000, 64, 16, solver="sgd",
                            optimizer="adagrad"), h100_profile(), "grid")
    assert dsgd.sweep_bytes == 200_000 * k * 4 * 2  # Q rows, b_i and one Adagrad sum each


def test_dsgd_adagrad_memory_is_the_blocks_state():
    """Grid DSGD with Adagrad: the sums of the user block and of the held item block, their
    row-sparse scratch (gradient sums + int32 marks), a shift buffer with the sums, no dense
    autograd gradients; the ring's bytes are the model rows and their sums. adam is noted
    as not run on the grid."""
    U, I, d, W = 2_000_000, 200_000, 64, 16
    k = d + 1
    U_loc, I_loc = math.ceil(U / W), math.ceil(I / W)
    sgd, ada = (estimate(Problem(U, I, 200_000_000, d, W, solver="sgd", optimizer=o),
                         h100_profile(), "grid") for o in ("sgd", "adagrad"))
    assert sgd.memory["optimizer state"] == 0 and "gradient sums" not in sgd.memory
    assert ada.memory["optimizer state"] == (U_loc + I_loc) * k * 4
    assert ada.memory["gradient sums"] == (U_loc + I_loc) * (k * 4 + 4)
    assert "gradients" not in ada.memory
    assert ada.memory["shift buffer"] == 2 * sgd.memory["shift buffer"] == 2 * I_loc * k * 4
    assert ada.sweep_bytes == 2 * sgd.sweep_bytes == 2 * I * k * 4
    assert ada.sweep_collectives == sgd.sweep_collectives == 2 * W
    assert any("Adagrad sums" in n for n in ada.notes)
    adam = estimate(Problem(U, I, 200_000_000, d, W, solver="sgd", optimizer="adam"),
                    h100_profile(), "grid")
    assert any("sgd or adagrad" in n for n in adam.notes)


def test_fit_verdict_and_capacity():
    big = Problem(100_000_000, 10_000_000, 10_000_000_000, 128, 64)
    e = estimate(big, h100_profile(), "items")
    assert not e.fits and e.memory_total > 48 * 2**30  # the whole user table alone is 48 GiB
    small = estimate(Problem(1000, 100, 10_000, 8, 2), h100_profile(), "grid")
    assert small.fits


def test_cpu_workers_share_the_cores():
    """On a CPU profile W processes split the cores: compute time per rank does not fall
    with W (same total work), while on GPUs it does."""
    p1, p4 = Problem(20_000, 2000, 1_000_000, 16, 1), Problem(20_000, 2000, 1_000_000, 16, 4)
    c1 = estimate(p1, CPU, "grid").sweep_time["compute"]
    c4 = estimate(p4, CPU, "grid").sweep_time["compute"]
    assert c4 == pytest.approx(c1, rel=0.05)
    g1 = estimate(p1, h100_profile(), "grid").sweep_time["compute"]
    g4 = estimate(p4, h100_profile(), "grid").sweep_time["compute"]
    assert g4 == pytest.approx(g1 / 4, rel=0.05)
    e = estimate(p4, CPU, "grid")
    assert cpu_seconds(e, CPU, 4) > 0


def test_problem_checks():
    with pytest.raises(ValueError, match="solver"):
        Problem(10, 10, 10, 2, 1, solver="newton").check()
    with pytest.raises(ValueError, match="workers"):
        Problem(10, 3, 10, 2, 4).check()
    with pytest.raises(ValueError, match="at least 1"):
        Problem(10, 10, 0, 2, 1).check()


def test_render_side_by_side():
    p = Problem(100_000, 10_000, 5_000_000, 32, 4)
    text = render(p, CPU, [estimate(p, CPU, "items"), estimate(p, CPU, "grid")])
    head = [ln for ln in text.splitlines() if ln.strip().startswith("items")]
    assert head and "grid" in head[0]
    for needle in ("bytes sent per sweep", "memory: total", "time per sweep: total", "fits?", "verdict"):
        assert needle in text


# -- the profile ----------------------------------------------------------------------------------------

def test_calibrate_writes_a_valid_profile(tmp_path):
    prof = calibrate(size="tiny", network=False, min_seconds=0.02)
    for f in ("gemm_flops", "solve_flops", "mem_bw", "copy_bw", "net_bw", "latency",
              "op_overhead", "memory_bytes"):
        assert getattr(prof, f) > 0 and math.isfinite(getattr(prof, f))
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert load_profile(path) == prof
    assert not list(tmp_path.glob(".*tmp*"))


def test_profile_rejects_bad_json():
    good = h100_profile().to_json()
    with pytest.raises(ValueError, match="lacks"):
        DeviceProfile.from_json({k: v for k, v in good.items() if k != "net_bw"})
    with pytest.raises(ValueError, match="positive"):
        DeviceProfile.from_json(dict(good, mem_bw=-1))


# -- the command line -------------------------------------------------------------------------------------

def test_cli_table_and_json(capsys):
    from svdfill.launch.cli import main

    argv = ["plan", "--users", "1M", "--items", "100k", "--ratings", "50M", "--factors", "32",
            "--workers", "8", "--device", "h100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "items" in out and "grid" in out and "fits" in out
    assert main(argv + ["--solver", "sgd", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [e["layout"] for e in got["estimates"]] == ["items", "grid"]
    assert got["problem"]["n_users"] == 1_000_000
    assert all(isinstance(e["fits"], bool) for e in got["estimates"])


def test_cli_errors(capsys, tmp_path):
    from svdfill.launch.cli import main

    assert main(["plan", "--items", "10", "--ratings", "100"]) == 2
    assert "--users" in capsys.readouterr().err
    assert main(["plan", "--users", "10", "--items", "10", "--ratings", "100", "--workers", "20"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--users", "10", "--items", "10", "--ratings", "100", "--profile", str(bad)]) == 2


def test_cli_uses_a_profile_file(tmp_path, capsys):
    from svdfill.launch.cli import main

    prof = cpu_profile(cores=2, memory_bytes=1 * 2**30)
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert main(["plan", "--users", "10M", "--items", "1M", "--ratings", "1G", "--profile",
                 str(path), "--layout", "items"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "grid" not in out.splitlines()[2]
