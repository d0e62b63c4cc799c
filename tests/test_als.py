"""kernels/als.py: batched ALS sweeps against a float64 per-row brute force, and ALS
training reaching the noise floor of planted synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svdfill.kernels.als import als_sweep
from svdfill.kernels.model import BiasedMF


def _random_problem(seed: int, n_users: int, n_items: int, n: int, d: int, *, empty_user: bool = True):
    """Ragged ratings: a Zipf-ish item popularity, one heavy user, repeated pairs allowed,
    and (optionally) a user and an item with no rating at all."""
    g = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = g.choice(n_items, size=n, p=w / w.sum())
    users = g.integers(0, n_users, size=n)
    users[: n // 4] = 1  # one heavy user: its row spans several segments when budgets are small
    if empty_user:
        users[users == n_users - 1] = 0
        items[items == n_items - 1] = 0
    ratings = g.integers(1, 6, size=n).astype(np.float32)
    ratings[::7] = 3.0  # ties in the targets
    model = BiasedMF(n_users, n_items, d, init_std=0.3, global_mean=float(ratings.mean()), seed=seed)
    with torch.no_grad():
        model.user_bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
        model.item_bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return (model, torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(ratings))


def _brute_side(rows, cols, r, mu, fixed_f, fixed_b, own_f, own_b, lf, lb, alpha, beta):
    """Per-row float64 ridge solve, one row at a time (the definition, no batching)."""
    own_f, own_b = own_f.copy(), own_b.copy()
    d = fixed_f.shape[1]
    for row in np.unique(rows):
        sel = rows == row
        z = np.concatenate([fixed_f[cols[sel]], np.ones((sel.sum(), 1))], 1)
        y = r[sel] - mu - fixed_b[cols[sel]]
        n = float(sel.sum())
        a = z.T @ z + np.diag([lf * n ** alpha] * d + [lb * n ** beta])
        if lf == 0 or lb == 0:
            x = np.linalg.lstsq(a, z.T @ y, rcond=None)[0]
        else:
            x = np.linalg.solve(a, z.T @ y)
        own_f[row] = x[:d]
        own_b[row] = x[d]
    return own_f, own_b


def _brute_sweep(model, users, items, ratings, lf, lb, alpha=1.0, beta=1.0):
    P = model.user_factors.detach().double().numpy()
    Q = model.item_factors.detach().double().numpy()
    bu = model.user_bias.detach().double().numpy()
    bi = model.item_bias.detach().double().numpy()
    mu = float(model.global_mean)
    u, i, r = users.numpy(), items.numpy(), ratings.double().numpy()
    P, bu = _brute_side(u, i, r, mu, Q, bi, P, bu, lf, lb, alpha, beta)
    Q, bi = _brute_side(i, u, r, mu, P, bu, Q, bi, lf, lb, alpha, beta)
    return P, Q, bu, bi


def _assert_close(model, ref, tol=2e-4):
    names = ("user_factors", "item_factors", "user_bias", "item_bias")
    for name, want in zip(names, ref):
        got = getattr(model, name).detach().double().cpu().numpy()
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= tol * scale, name


@pytest.mark.parametrize("budget", [None, 200, 37])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.0, 0.0), (0.6, 0.0)])
def test_sweep_matches_float64_brute_force(budget, alpha, beta):
    model, u, i, r = _random_problem(0, 40, 25, 900, 5)
    ref = _brute_sweep(model, u, i, r, 0.07, 0.02, alpha, beta)
    als_sweep(model, u, i, r, reg_factors=0.07, reg_bias=0.02, reg_exponent=alpha,
              bias_reg_exponent=beta, budget_elements=budget)
    _assert_close(model, ref)


@pytest.mark.parametrize("budget", [None, 200, 37])
def test_grouped_augmented_equations_match_float64(budget):
    """Each group's augmented Gram ``[Z, y]ᵀ[Z, y]`` (rows in ``group.rows`` order, rows
    longer than one segment summed, groups within the budget) equals the float64 definition,
    and the groups cover every rated row exactly once."""
    from svdfill.kernels.als import (DEFAULT_BUDGET_ELEMENTS, group_equations, rating_plan,
                                     side_features_augmented, side_groups)

    model, u, i, r = _random_problem(3, 40, 25, 900, 5)
    k = 6  # d = 5 factors and the bias
    b = DEFAULT_BUDGET_ELEMENTS if budget is None else budget
    plan = rating_plan(u.long(), i.long(), 40, 25, k, torch.device("cpu"), b)
    mu = float(model.global_mean)
    centered = torch.cat([r - mu, torch.zeros(1)])
    Q = model.item_factors.detach()
    bi = model.item_bias.detach()
    feats = side_features_augmented(Q, bi)
    groups = side_groups(plan.user_side, k, b)
    assert side_groups(plan.user_side, k, b) is groups  # cached on the side
    seen = torch.cat([g.rows for g in groups]).sort().values
    assert torch.equal(seen, torch.unique(u.long()))
    un, i64, r64 = u.numpy(), i.numpy(), r.double().numpy()
    for g in groups:
        assert len(g.chunks) == 1 or g.rows.numel() * (k + 1) ** 2 <= b
        aug = group_equations(feats, centered, g, b).double().numpy()
        for j, row in enumerate(g.rows.tolist()):
            sel = un == row
            z = np.concatenate([Q.double().numpy()[i64[sel]], np.ones((sel.sum(), 1)),
                                (r64[sel] - mu - bi.double().numpy()[i64[sel]])[:, None]], 1)
            want = z.T @ z
            assert np.abs(aug[j] - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), row
        assert np.array_equal(g.weight.numpy(), np.bincount(un, minlength=40)[g.rows.numpy()])


def test_sweep_repeated_reuses_plan_and_stays_exact():
    """Several sweeps over the same index tensors (the trainer's pattern) match several
    brute-force sweeps; a plan built for one set of tensors is never used for another."""
    model, u, i, r = _random_problem(1, 30, 20, 600, 4)
    ref_model, *_ = _random_problem(1, 30, 20, 600, 4)
    for _ in range(3):
        ref = _brute_sweep(ref_model, u, i, r, 0.1, 0.05)
        with torch.no_grad():
            for name, val in zip(("user_factors", "item_factors", "user_bias", "item_bias"), ref):
                getattr(ref_model, name).copy_(torch.from_numpy(val).float())
        als_sweep(model, u, i, r, reg_factors=0.1, reg_bias=0.05, budget_elements=64)
    _assert_close(model, ref, tol=1e-3)
    # modify the index tensor in place: the cached plan must not be reused
    u2 = u.clone()
    model2, *_ = _random_problem(1, 30, 20, 600, 4)
    als_sweep(model2, u2, i, r, reg_factors=0.1, reg_bias=0.05)
    u2[:100] = (u2[:100] + 3) % 29
    model3, *_ = _random_problem(1, 30, 20, 600, 4)
    ref = _brute_sweep(model3, u2, i, r, 0.1, 0.05)
    als_sweep(model3, u2, i, r, reg_factors=0.1, reg_bias=0.05)
    _assert_close(model3, ref)


def test_rows_without_ratings_are_untouched_and_int32_ids_work():
    model, u, i, r = _random_problem(2, 12, 9, 200, 3)
    before_u = model.user_factors.detach().clone()[-1]
    before_i = model.item_bias.detach().clone()[-1]
    als_sweep(model, u.int(), i.int(), r, reg_factors=0.05, reg_bias=0.05)
    assert torch.equal(model.user_factors.detach()[-1], before_u)
    assert torch.equal(model.item_bias.detach()[-1], before_i)


def test_unregularized_rank_deficient_rows_stay_finite_and_fit():
    """λ = 0 with fewer ratings than unknowns: the Cholesky fails (or is ill-conditioned)
    and the pinv fallback keeps every solution finite, fitting the training ratings about
    as well as float64 least squares does."""
    model, u, i, r = _random_problem(3, 20, 15, 120, 6, empty_user=False)
    P, Q, bu, bi = _brute_sweep(model, u, i, r, 0.0, 0.0)
    als_sweep(model, u, i, r, reg_factors=0.0, reg_bias=0.0)
    for t in (model.user_factors, model.item_factors, model.user_bias, model.item_bias):
        assert torch.isfinite(t).all()
    rr = r.double().numpy()
    got = model.predict(u, i).double().numpy()
    want = float(model.global_mean) + bu[u] + bi[i] + (P[u] * Q[i]).sum(1)
    rmse = lambda p: math.sqrt(float(((p - rr) ** 2).mean()))  # noqa: E731
    assert rmse(got) <= rmse(want) + 0.02


def test_bad_inputs_raise():
    model, u, i, r = _random_problem(4, 10, 8, 50, 2)
    with pytest.raises(ValueError, match="1-d of one length"):
        als_sweep(model, u[:-1], i, r, reg_factors=0.1, reg_bias=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        als_sweep(model, u, i, r, reg_factors=-1.0, reg_bias=0.1)
    with pytest.raises(ValueError, match="exponents"):
        als_sweep(model, u, i, r, reg_factors=0.1, reg_bias=0.1, reg_exponent=-0.5)
    bad = u.clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"users ids must lie in \[0, 10\)"):
        als_sweep(model, bad, i, r, reg_factors=0.1, reg_bias=0.1)
    r_nan = r.clone()
    r_nan[0] = float("nan")
    with pytest.raises(FloatingPointError):
        als_sweep(model, u, i, r_nan, reg_factors=0.1, reg_bias=0.1)
    als_sweep(model, u[:0], i[:0], r[:0], reg_factors=0.1, reg_bias=0.1)  # empty: a no-op


def test_als_training_reaches_noise_floor_on_planted_data():
    """Planted rank-4 factors + biases, σ = 0.3, ~40% dense (~70 ratings per user): ALS at
    the planted rank fits held-out ratings to within 10% of σ in a few sweeps."""
    g = np.random.default_rng(7)
    n_users, n_items, rank, sigma = 300, 200, 4, 0.3
    P = g.normal(0, 0.6, (n_users, rank))
    Q = g.normal(0, 0.6, (n_items, rank))
    bu, bi = g.normal(0, 0.3, n_users), g.normal(0, 0.3, n_items)
    mask = g.random((n_users, n_items)) < 0.4
    uu, ii = np.nonzero(mask)
    r = 3.5 + bu[uu] + bi[ii] + (P[uu] * Q[ii]).sum(1) + g.normal(0, sigma, uu.size)
    perm = g.permutation(uu.size)
    n_val = uu.size // 10
    va, tr = perm[:n_val], perm[n_val:]
    t = lambda a, idx, dt: torch.from_numpy(a[idx]).to(dt)  # noqa: E731
    model = BiasedMF(n_users, n_items, rank, init_std=0.1, global_mean=float(r[tr].mean()), seed=0)
    for _ in range(8):
        als_sweep(model, t(uu, tr, torch.int64), t(ii, tr, torch.int64), t(r, tr, torch.float32),
                  reg_factors=0.01, reg_bias=0.01)
    pred = model.predict(t(uu, va, torch.int64), t(ii, va, torch.int64)).double().numpy()
    val_rmse = math.sqrt(float(((pred - r[va]) ** 2).mean()))
    assert val_rmse < 1.1 * sigma, val_rmse


def test_trainer_als_solver_on_synthetic_config(tmp_path):
    """The trainer's ``solver = "als"`` path on the synthetic preset ends near σ."""
    from svdfill.config import apply_overrides, load_config
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split
    from svdfill.train import fit

    cfg = apply_overrides(load_config(None), {
        "data.synthetic.n_users": 600, "data.synthetic.n_items": 300,
        "data.synthetic.n_ratings": 60_000, "data.synthetic.rank": 4, "data.synthetic.noise": 0.5,
        "model.factors": 8, "model.init_std": 0.1, "train.solver": "als", "train.epochs": 8,
        "train.reg_factors": 0.03, "train.reg_bias": 0.01, "train.patience": 0,
    })
    ratings, _ = load_dataset(cfg.data)
    train, val = split(ratings, fraction=0.1, seed=0)
    res = fit(cfg, train, val, quiet=True)
    assert res.summary["val_rmse"] < 0.5 * 1.08, res.summary["val_rmse"]
    assert len(res.history) == 8


def test_plan_cache_is_dropped_with_its_index_tensors():
    import gc

    from svdfill.kernels import als

    model, u, i, r = _random_problem(5, 10, 8, 80, 2)
    u2, i2 = u.clone(), i.clone()
    als_sweep(model, u2, i2, r, reg_factors=0.1, reg_bias=0.1)
    assert als._cache
    del u2, i2
    gc.collect()
    assert not als._cache


class _ThreadSum:
    """An in-place sum over W threads standing in for the ranks of an item-sharded world:
    each rank calls it with same-shaped tensors in the same order (a collective's contract),
    and every rank gets the parts added in the same order, as an all-reduce delivers."""

    def __init__(self, world_size: int):
        import threading

        self.parts: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size)
        self.calls = [0] * world_size

    def of_rank(self, rank: int):
        def user_sum(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.calls[rank] += 1
            self.barrier.wait()
            total = self.parts[0].clone()
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()
            return t.copy_(total)
        return user_sum


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("budget", [None, 200, 37])
@pytest.mark.parametrize("shards", [[(0, 7), (7, 25)], [(0, 7), (7, 24), (24, 25)]])
def test_item_sharded_sweeps_equal_the_float64_brute_force(budget, shards, device, request):
    """Ranks that own item shards (the last one, item 24, has no rating at all) sweep with
    their users' normal equations summed across ranks: every rank ends with the same user
    table, bit for bit, and the tables match two float64 sweeps over all ratings. Budgets
    of 200 and 37 elements cut the users into 5-user and 1-user blocks. On CUDA the ranks
    share the GPU."""
    import threading

    if device == "cuda":
        request.getfixturevalue("cuda")  # skips without CUDA

    model, u, i, r = _random_problem(4, 40, 25, 900, 5)
    full = {k: v.clone() for k, v in model.state_tensors().items()}
    ref_model, *_ = _random_problem(4, 40, 25, 900, 5)
    for _ in range(2):
        ref = _brute_sweep(ref_model, u, i, r, 0.07, 0.02, 0.6, 0.0)
        with torch.no_grad():
            for name, val in zip(("user_factors", "item_factors", "user_bias", "item_bias"), ref):
                getattr(ref_model, name).copy_(torch.from_numpy(val).float())
    counts = torch.bincount(u, minlength=40).to(device)
    summer = _ThreadSum(len(shards))
    ranks: list[BiasedMF] = []
    errors: list[BaseException] = []
    for lo, hi in shards:
        state = dict(full, item_factors=full["item_factors"][lo:hi].clone(),
                     item_bias=full["item_bias"][lo:hi].clone())
        ranks.append(BiasedMF.from_state(state, device, item_offset=lo))

    def run(rank: int) -> None:
        lo, hi = shards[rank]
        keep = (i >= lo) & (i < hi)
        uu, ii, rr = (t.to(device) for t in (u[keep], i[keep] - lo, r[keep]))
        try:
            for _ in range(2):
                als_sweep(ranks[rank], uu, ii, rr, reg_factors=0.07, reg_bias=0.02,
                          reg_exponent=0.6, bias_reg_exponent=0.0, budget_elements=budget,
                          user_sum=summer.of_rank(rank), user_counts=counts)
        except BaseException as e:  # surfaced below, with the barrier broken for the others
            errors.append(e)
            summer.barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(summer.calls)) == 1 and summer.calls[0] >= 4
    for m in ranks[1:]:
        assert torch.equal(m.user_factors, ranks[0].user_factors)
        assert torch.equal(m.user_bias, ranks[0].user_bias)
    merged = BiasedMF.from_state(dict(
        full, user_factors=ranks[0].user_factors.detach().cpu(),
        user_bias=ranks[0].user_bias.detach().cpu(),
        item_factors=torch.cat([m.item_factors.detach().cpu() for m in ranks]),
        item_bias=torch.cat([m.item_bias.detach().cpu() for m in ranks])))
    _assert_close(merged, ref, tol=1e-3)


def test_item_sharded_sweep_arguments():
    model, u, i, r = _random_problem(5, 10, 8, 100, 3)
    with pytest.raises(ValueError, match="go together"):
        als_sweep(model, u, i, r, reg_factors=0.1, reg_bias=0.1, user_sum=lambda t: t)
    with pytest.raises(ValueError, match=r"user_counts must be \[10\]"):
        als_sweep(model, u, i, r, reg_factors=0.1, reg_bias=0.1, user_sum=lambda t: t,
                  user_counts=torch.ones(9))
    # a world of one: the summed path is the plain sweep
    plain, *_ = _random_problem(5, 10, 8, 100, 3)
    als_sweep(plain, u, i, r, reg_factors=0.1, reg_bias=0.1)
    als_sweep(model, u, i, r, reg_factors=0.1, reg_bias=0.1, user_sum=lambda t: t,
              user_counts=torch.bincount(u, minlength=10), budget_elements=40)
    for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
        torch.testing.assert_close(getattr(model, name), getattr(plain, name), rtol=1e-5, atol=1e-6)


def test_sweep_on_cuda_matches_float64_brute_force(cuda):
    model, u, i, r = _random_problem(6, 40, 25, 900, 5)
    ref = _brute_sweep(model, u, i, r, 0.07, 0.02, 0.6, 0.0)
    model = model.to(cuda)
    als_sweep(model, u.to(cuda), i.to(cuda), r.to(cuda), reg_factors=0.07, reg_bias=0.02,
              reg_exponent=0.6, bias_reg_exponent=0.0, budget_elements=200)
    assert model.user_factors.device.type == "cuda"
    _assert_close(model, ref)


def test_chunk_budget_is_device_aware(monkeypatch):
    """CPU keeps the cache-sized budget (CPU results do not depend on the machine); CUDA
    takes a sixteenth of its free memory at first use, clamped, cached per device (so the
    cached plan is reused every sweep). The GPU is faked: only the free-memory query is."""
    from svdfill.kernels import als

    assert als.default_budget_elements("cpu") == als.DEFAULT_BUDGET_ELEMENTS
    monkeypatch.setattr(als, "_DEVICE_BUDGET", {})
    free = {"n": 64 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["n"], 80 << 30))
    got = als.default_budget_elements(torch.device("cuda", 1))
    assert got == (64 << 30) // 64 or got == als.MAX_CUDA_BUDGET_ELEMENTS
    assert als.DEFAULT_BUDGET_ELEMENTS < got <= als.MAX_CUDA_BUDGET_ELEMENTS
    free["n"] = 1 << 20  # later calls: the cached answer, not a new one
    assert als.default_budget_elements("cuda:1") == got
    assert als.default_budget_elements("cuda:2") == als.DEFAULT_BUDGET_ELEMENTS  # never below


def test_spd_solve_checks_with_one_sync_and_falls_back():
    """Singular systems get the least-squares solution; a non-finite one raises — whether
    the bad row's Cholesky failed or not."""
    from svdfill.kernels.als import _spd_solve

    a = torch.eye(3).repeat(4, 1, 1)
    a[1] = 0.0  # singular: pinv
    b = torch.ones(4, 3, 1)
    x = _spd_solve(a.clone(), b)
    assert torch.equal(x[1], torch.zeros(3, 1)) and torch.equal(x[0], b[0])
    b_nan = b.clone()
    b_nan[2, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        _spd_solve(a.clone(), b_nan)
    b_nan = b.clone()
    b_nan[1, 0, 0] = float("nan")  # the singular row's least-squares solution is NaN
    with pytest.raises(FloatingPointError):
        _spd_solve(a.clone(), b_nan)
