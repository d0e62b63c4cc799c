"""kernels/gibbs.py: the batched conditionals against a float64 per-row reference, the
draws' distribution, the Normal-Wishart/Wishart samplers, the running low-rank posterior
mean, determinism and resume of the chain, and the posterior mean beating a tuned MAP fit
where the data are thin."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from svdfill.kernels.als import als_sweep, rating_plan
from svdfill.kernels.gibbs import (GibbsChain, GibbsPriors, LowRankMean, row_moments, sample_normal_wishart,
                                   sample_side, sample_wishart)
from svdfill.kernels.model import BiasedMF


def _problem(seed: int, n_users: int, n_items: int, n: int):
    """Ragged ratings: Zipf-ish items, one heavy user, a user and an item with no rating."""
    g = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = g.choice(n_items, size=n, p=w / w.sum())
    users = g.integers(0, n_users, size=n)
    users[: n // 4] = 1
    users[users == n_users - 1] = 0
    items[items == n_items - 1] = 0
    ratings = g.integers(1, 6, size=n).astype(np.float32)
    return torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(ratings)


def _spd(g: np.random.Generator, d: int) -> np.ndarray:
    a = g.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def _reference_side(rows, cols, r, mu, fixed_f, fixed_b, alpha, prec, mean, tau):
    """Per-row float64 conditional mean and precision (the definition, no batching)."""
    d = fixed_f.shape[1]
    out = {}
    p0 = np.zeros((d + 1, d + 1))
    p0[:d, :d] = prec
    p0[d, d] = tau
    h0 = np.concatenate([prec @ mean, [0.0]])
    for row in np.unique(rows):
        sel = rows == row
        z = np.concatenate([fixed_f[cols[sel]], np.ones((sel.sum(), 1))], 1)
        y = r[sel] - mu - fixed_b[cols[sel]]
        a = alpha * z.T @ z + p0
        out[int(row)] = (np.linalg.solve(a, alpha * z.T @ y + h0), a, z, y)
    return out


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        return request.getfixturevalue("cuda")
    return torch.device("cpu")


@pytest.mark.parametrize("budget", [None, 200, 37])
def test_conditional_means_match_float64_reference(budget, device):
    g = np.random.default_rng(0)
    n_users, n_items, d = 40, 25, 5
    u, i, r = _problem(0, n_users, n_items, 900)
    mu = float(r.mean())
    P = torch.from_numpy(g.normal(0, 0.3, (n_users, d)).astype(np.float32))
    Q = torch.from_numpy(g.normal(0, 0.3, (n_items, d)).astype(np.float32))
    bu = torch.from_numpy(g.normal(0, 0.2, n_users).astype(np.float32))
    bi = torch.from_numpy(g.normal(0, 0.2, n_items).astype(np.float32))
    prec, mean, alpha, tau = _spd(g, d), g.normal(0, 0.1, d), 1.7, 3.0
    plan = rating_plan(u.long().to(device), i.long().to(device), n_users, n_items, d + 1, device,
                       **({} if budget is None else {"budget": budget}))
    centered = torch.cat([r - mu, torch.zeros(1)]).to(device)
    ref = _reference_side(u.numpy(), i.numpy(), r.double().numpy(), mu, Q.double().numpy(),
                          bi.double().numpy(), alpha, prec, mean, tau)
    own_f, own_b = P.clone().to(device), bu.clone().to(device)
    mf, mb = torch.zeros_like(own_f), torch.zeros_like(own_b)
    fit = sample_side(own_f, own_b, Q.to(device), bi.to(device), centered, plan.user_side, alpha=alpha,
                      prior_mean=torch.from_numpy(mean), prior_prec=torch.from_numpy(prec),
                      bias_prec=tau, generator=None, mean_f=mf, mean_b=mb,
                      **({} if budget is None else {"budget": budget}))
    own_f, own_b, mf = own_f.cpu(), own_b.cpu(), mf.cpu()
    want_fit = 0.0
    for row, (x, _a, z, y) in ref.items():
        assert np.allclose(own_f[row].double().numpy(), x[:d], atol=2e-4), row
        assert abs(float(own_b[row]) - x[d]) < 2e-4
        assert np.allclose(mf[row].double().numpy(), x[:d], atol=2e-4)  # no noise: draw = mean
        want_fit += float(x @ (z.T @ z) @ x - 2 * x @ (z.T @ y))
    # the user without ratings is untouched
    assert torch.equal(own_f[n_users - 1], P[n_users - 1]) and own_b[n_users - 1] == bu[n_users - 1]
    assert fit == pytest.approx(want_fit, rel=1e-4, abs=1e-3)
    # with_targets: the residual sum of squares Σ (y − Z x)² of the new draws, for α's update
    own_f, own_b = P.clone().to(device), bu.clone().to(device)
    sse = sample_side(own_f, own_b, Q.to(device), bi.to(device), centered, plan.user_side,
                      alpha=alpha, prior_mean=torch.from_numpy(mean),
                      prior_prec=torch.from_numpy(prec), bias_prec=tau,
                      generator=torch.Generator(device=device).manual_seed(5), with_targets=True,
                      **({} if budget is None else {"budget": budget}))
    own_f, own_b = own_f.cpu().double().numpy(), own_b.cpu().double().numpy()
    want_sse = sum(float(((y - z @ np.concatenate([own_f[row], [own_b[row]]])) ** 2).sum())
                   for row, (_x, _a, z, y) in ref.items())
    assert sse == pytest.approx(want_sse, rel=1e-4)


def _shared_conditional(g):
    """2,000 users with the same five ratings: one conditional shared by all rows."""
    n_users, n_items, d = 2000, 6, 2
    items = np.tile(np.arange(5), n_users)
    users = np.repeat(np.arange(n_users), 5)
    ratings = np.tile(np.array([5, 3, 4, 1, 2], dtype=np.float32), n_users)
    u, i, r = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(ratings)
    Q = torch.from_numpy(g.normal(0, 0.7, (n_items, d)).astype(np.float32))
    bi = torch.from_numpy(g.normal(0, 0.3, n_items).astype(np.float32))
    prec, mean, alpha, tau = _spd(g, d), np.array([0.2, -0.1]), 1.3, 2.0
    plan = rating_plan(u, i, n_users, n_items, d + 1, torch.device("cpu"))
    centered = torch.cat([r - 3.0, torch.zeros(1)])
    x_mean, a, _, _ = _reference_side(users[:5], items[:5], ratings[:5].astype(np.float64), 3.0,
                                      Q.double().numpy(), bi.double().numpy(), alpha, prec, mean, tau)[0]

    def draw(P, bu, seed, rho=0.0):
        sample_side(P, bu, Q, bi, centered, plan.user_side, alpha=alpha, prior_mean=torch.from_numpy(mean),
                    prior_prec=torch.from_numpy(prec), bias_prec=tau,
                    generator=torch.Generator().manual_seed(seed), overrelax=rho)
        return torch.cat([P, bu[:, None]], 1).double().numpy()

    return n_users, d, draw, x_mean, np.linalg.inv(a)


def _assert_gaussian(draws, mean, cov):
    n = draws.shape[0]
    assert np.all(np.abs(draws.mean(0) - mean) < 4.5 * np.sqrt(np.diag(cov) / n))
    # covariance entries: standard error ≈ sqrt((σ_ii σ_jj + σ_ij²)/N)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    assert np.all(np.abs(np.cov(draws.T) - cov) < 4.5 * se_cov)


def test_draws_follow_the_conditional_distribution():
    """Every row's draw comes from N(A⁻¹h, A⁻¹): their mean and covariance match the
    float64 reference within sampling error."""
    n_users, d, draw, x_mean, cov = _shared_conditional(np.random.default_rng(1))
    _assert_gaussian(draw(torch.zeros(n_users, d), torch.zeros(n_users), 3), x_mean, cov)


def test_over_relaxed_draws_keep_the_conditional_and_reflect_the_old_draw():
    n_users, d, draw, x_mean, cov = _shared_conditional(np.random.default_rng(1))
    rho = -0.9
    # from rows already distributed as the conditional, the over-relaxed draw is too ...
    P, bu = torch.zeros(n_users, d), torch.zeros(n_users)
    first = draw(P, bu, 3)
    second = draw(P, bu, 4, rho)
    _assert_gaussian(second, x_mean, cov)
    # ... and anticorrelated with the old draw: corr = ρ per coordinate
    corr = [np.corrcoef(first[:, j], second[:, j])[0, 1] for j in range(d + 1)]
    assert np.allclose(corr, rho, atol=0.03)
    # from fixed rows x the draws centre on m + ρ(x − m) with covariance (1 − ρ²)A⁻¹
    start = x_mean + np.array([0.5, -0.3, 0.2])
    P = torch.from_numpy(np.tile(start[:d], (n_users, 1))).float()
    bu = torch.full((n_users,), float(start[d]))
    _assert_gaussian(draw(P, bu, 5, rho), x_mean + rho * (start - x_mean), (1 - rho ** 2) * cov)


def test_wishart_and_normal_wishart_samplers():
    g = np.random.default_rng(2)
    scale = _spd(g, 3) / 10
    draws = np.stack([sample_wishart(g, scale, 7.0) for _ in range(3000)])
    assert np.allclose(draws.mean(0), 7.0 * scale, atol=4 * np.sqrt(7.0 * 2 / 3000) * scale.max())
    with pytest.raises(ValueError, match="dof"):
        sample_wishart(g, scale, 1.5)
    # with many rows the posterior concentrates on the rows' mean and inverse covariance
    cov = _spd(g, 3)
    x = torch.from_numpy(g.multivariate_normal([1.0, -2.0, 0.5], cov, size=200_000))
    n, m, scatter = row_moments(x)
    assert n == 200_000 and np.allclose(m, [1.0, -2.0, 0.5], atol=0.02)
    mean, lam = sample_normal_wishart(g, n, m, scatter, GibbsPriors())
    assert np.allclose(mean, m, atol=0.02)
    assert np.allclose(lam, np.linalg.inv(cov), rtol=0.03, atol=0.02)
    assert row_moments(torch.zeros(0, 3))[0] == 0


@pytest.mark.parametrize("n_rows,n_cols,dims", [(37, 23, [2, 3, 1, 2]), (5, 41, [1, 1]), (64, 64, [4, 4, 4])])
def test_low_rank_mean_is_exact_within_its_rank(n_rows, n_cols, dims):
    g = np.random.default_rng(n_rows)
    total = np.zeros((n_rows, n_cols))
    lr = LowRankMean(n_rows, n_cols, rank=sum(dims) * 2, device="cpu")
    for t, dd in enumerate(dims):
        pairs = [(torch.from_numpy(g.normal(size=(n_rows, dd)).astype(np.float32)),
                  torch.from_numpy(g.normal(size=(n_cols, dd)).astype(np.float32))) for _ in range(2)]
        total += sum(a.double().numpy() @ b.double().numpy().T for a, b in pairs) / 2
        lr.add(pairs)
        want = total / (t + 1)
        got = (lr.u.double() * lr.s.double()) @ lr.v.double().T
        assert np.abs(got.numpy() - want).max() < 2e-5 * max(1.0, np.abs(want).max())
    rank = min(sum(dims) * 2, n_rows, n_cols, sum(dims) * 2)
    # factors(d) is the best rank-d part: equals the float64 truncated SVD of the mean
    d = 2
    p, q = lr.factors(d)
    uu, ss, vt = np.linalg.svd(total / len(dims))
    best = (uu[:, :d] * ss[:d]) @ vt[:d]
    assert np.abs((p.double() @ q.double().T).numpy() - best).max() < 1e-4 * max(1.0, np.abs(best).max())
    assert lr.s.shape[0] <= rank
    # wider than the mean's rank: zero columns, same product
    p8, q8 = lr.factors(n_rows + n_cols)
    assert p8.shape == (n_rows, n_rows + n_cols)
    assert torch.allclose(p8 @ q8.T, (lr.u * lr.s) @ lr.v.T, atol=1e-5)


def test_low_rank_mean_truncates_to_the_dominant_part():
    """A mean that is rank 3 plus a small full-rank part, accumulated at rank 6, stays
    within the small part's size of the float64 truncated SVD."""
    g = np.random.default_rng(4)
    base_a, base_b = g.normal(size=(50, 3)), g.normal(size=(30, 3))
    lr = LowRankMean(50, 30, rank=6, device="cpu")
    total = np.zeros((50, 30))
    for _ in range(20):
        a = base_a + 0.01 * g.normal(size=(50, 3))
        b = base_b + 0.01 * g.normal(size=(30, 3))
        total += a @ b.T
        lr.add([(torch.from_numpy(a).float(), torch.from_numpy(b).float())])
    p, q = lr.factors(3)
    uu, ss, vt = np.linalg.svd(total / 20)
    best = (uu[:, :3] * ss[:3]) @ vt[:3]
    assert np.abs((p.double() @ q.double().T).numpy() - best).max() < 1e-3 * np.abs(best).max()


def _chain(seed=0, d=3, n_users=60, n_items=30, n=1500, device="cpu"):
    u, i, r = _problem(seed, n_users, n_items, n)
    model = BiasedMF(n_users, n_items, d, init_std=0.1, global_mean=float(r.mean()), seed=seed).to(device)
    chain = GibbsChain(model.state_tensors(), alpha=1.5, priors=GibbsPriors(), mean_rank=2 * d,
                       overrelax=-0.9)
    return chain, u.long().to(device), i.long().to(device), r.to(device)


def test_chain_is_deterministic_and_resumes_exactly():
    a, u, i, r = _chain()
    for s in range(6):
        a.sweep(u, i, r, seed=100 + s, accumulate=s >= 2)
    b, _, _, _ = _chain()
    for s in range(3):
        b.sweep(u, i, r, seed=100 + s, accumulate=s >= 2)
    buf = io.BytesIO()
    torch.save(b.state(), buf)
    buf.seek(0)
    c, _, _, _ = _chain()
    c.load_state(torch.load(buf, weights_only=True))
    for s in range(3, 6):
        c.sweep(u, i, r, seed=100 + s, accumulate=s >= 2)
    assert c.samples == a.samples == 4 and c.alpha == a.alpha
    for k, v in a.mean_state(3).items():
        assert torch.equal(v, c.mean_state(3)[k]), k
    # the noise precision tracks the residuals: 1/σ² of the current draw, roughly
    resid = float(((BiasedMF.from_state(a.current_state()).predict(u, i) - r) ** 2).mean())
    assert 0.5 / resid < a.alpha < 2.0 / resid


def test_chain_on_cuda_tracks_the_cpu_chain(cuda):
    """The same sweeps on CUDA (other random numbers, same distributions) reach about the
    same noise level and a posterior mean that fits the ratings as well as the CPU one."""
    fits = []
    for dev in ("cpu", cuda):
        c, u, i, r = _chain(device=dev)
        for s in range(30):
            c.sweep(u, i, r, seed=s, accumulate=s >= 3)
        m = BiasedMF.from_state({k: v.cpu() for k, v in c.mean_state(3).items()})
        fits.append((c.noise_sigma, float(((m.predict(u.cpu(), i.cpu()) - r.cpu()) ** 2).mean().sqrt())))
    (s_cpu, f_cpu), (s_gpu, f_gpu) = fits
    assert abs(s_cpu - s_gpu) < 0.1 * s_cpu and abs(f_cpu - f_gpu) < 0.05 * f_cpu, fits


def test_mean_state_before_averaging_is_the_current_draw():
    a, u, i, r = _chain()
    a.sweep(u, i, r, seed=1, accumulate=False)
    st = a.mean_state(3)
    assert st["user_factors"] is a.P and a.samples == 0
    a.sweep(u, i, r, seed=2, accumulate=True)
    st = a.mean_state(3)
    assert st["user_factors"].shape == (60, 3) and a.samples == 1
    assert math.isfinite(a.noise_sigma)


def _planted_thin():
    """Planted rank-5 factors, σ = 0.5, 800 users × 300 items, ~20 ratings per user: the
    training ratings (u, i, y) and an ``rmse(model)`` on the held-out tenth."""
    g = np.random.default_rng(11)
    n_users, n_items, rank, sigma = 800, 300, 5, 0.5
    P = g.normal(0, 0.5, (n_users, rank))
    Q = g.normal(0, 0.5, (n_items, rank))
    bu, bi = g.normal(0, 0.3, n_users), g.normal(0, 0.3, n_items)
    mask = g.random((n_users, n_items)) < 22 / n_items
    uu, ii = np.nonzero(mask)
    r = 3.5 + bu[uu] + bi[ii] + (P[uu] * Q[ii]).sum(1) + g.normal(0, sigma, uu.size)
    perm = g.permutation(uu.size)
    va, tr = perm[: uu.size // 10], perm[uu.size // 10:]
    T = lambda a, idx, dt: torch.from_numpy(a[idx]).to(dt)  # noqa: E731
    u, i, y = T(uu, tr, torch.int64), T(ii, tr, torch.int64), T(r, tr, torch.float32)
    vu, vi, vy = T(uu, va, torch.int64), T(ii, va, torch.int64), torch.from_numpy(r[va])

    def rmse(m):
        return math.sqrt(float(((m.predict(vu, vi).double() - vy) ** 2).mean()))

    return u, i, y, rmse, (n_users, n_items, rank, sigma)


def test_posterior_mean_beats_the_map_fit_on_thin_planted_data():
    """Where rows are thin the posterior mean over draws predicts held-out ratings better
    than the best ALS ridge penalty of a small grid (tuned on the held-out set itself — an
    unfair advantage)."""
    u, i, y, rmse, (n_users, n_items, rank, sigma) = _planted_thin()

    als_best = math.inf
    for lam in (0.03, 0.1, 0.3):
        m = BiasedMF(n_users, n_items, rank, init_std=0.1, global_mean=float(y.mean()), seed=0)
        for _ in range(10):
            als_sweep(m, u, i, y, reg_factors=lam, reg_bias=0.05)
        als_best = min(als_best, rmse(m))
    m = BiasedMF(n_users, n_items, rank, init_std=0.1, global_mean=float(y.mean()), seed=0)
    for _ in range(3):
        als_sweep(m, u, i, y, reg_factors=0.1, reg_bias=0.05)
    chain = GibbsChain(m.state_tensors(), alpha=2.0, priors=GibbsPriors(), mean_rank=2 * rank)
    for s in range(60):
        chain.sweep(u, i, y, seed=s, accumulate=s >= 5)
    bayes = rmse(BiasedMF.from_state(chain.mean_state(rank)))
    assert bayes < als_best - 0.005, (bayes, als_best)
    assert abs(chain.noise_sigma - sigma) < 0.1 * sigma


def test_non_finite_inputs_raise():
    a, u, i, r = _chain()
    bad = r.clone()
    bad[3] = float("nan")
    with pytest.raises(FloatingPointError):
        a.sweep(u, i, bad, seed=0, accumulate=False)


def test_item_sharded_chain_agrees_across_ranks_and_fits_as_one_process():
    """Two ranks (threads standing in for an item-sharded world) own items [0, 140) and
    [140, 300): after every sweep both hold the same user rows and α, bit for bit, and in
    the end the same posterior-mean user factors; their stacked item factors make a
    posterior mean that predicts held-out ratings as well as the one-process chain's (other
    noise, the same distribution) and recovers σ."""
    import threading

    from svdfill.kernels.gibbs import pooled_basis
    from test_als import _ThreadSum

    u, i, y, rmse, (n_users, n_items, rank, sigma) = _planted_thin()
    counts = torch.bincount(u, minlength=n_users)
    sweeps = 40

    def warm(m, uu, ii, yy, **shard):
        for _ in range(3):
            als_sweep(m, uu, ii, yy, reg_factors=0.1, reg_bias=0.05, **shard)

    one = BiasedMF(n_users, n_items, rank, init_std=0.1, global_mean=float(y.mean()), seed=0)
    full0 = {k: v.clone() for k, v in one.state_tensors().items()}
    warm(one, u, i, y)
    chain = GibbsChain(one.state_tensors(), alpha=2.0, priors=GibbsPriors(), mean_rank=2 * rank,
                       overrelax=-0.9)
    for s in range(sweeps):
        chain.sweep(u, i, y, seed=s, accumulate=s >= 3)
    single = rmse(BiasedMF.from_state(chain.mean_state(rank)))

    shards = [(0, 140), (140, n_items)]
    summer = _ThreadSum(2)
    trace: list[list] = [[], []]
    out: list = [None, None]
    errors: list[BaseException] = []

    def run(r: int) -> None:
        lo, hi = shards[r]
        keep = (i >= lo) & (i < hi)
        uu, ii, yy = u[keep], i[keep] - lo, y[keep]
        m = BiasedMF.from_state(dict(full0, item_factors=full0["item_factors"][lo:hi],
                                     item_bias=full0["item_bias"][lo:hi]), item_offset=lo)
        try:
            warm(m, uu, ii, yy, user_sum=summer.of_rank(r), user_counts=counts)
            c = GibbsChain(m.state_tensors(), alpha=2.0, priors=GibbsPriors(),
                           mean_rank=2 * rank, overrelax=-0.9, shard_sum=summer.of_rank(r),
                           user_counts=counts, n_items_total=n_items, rank=r)
            for s in range(sweeps):
                c.sweep(uu, ii, yy, seed=s, accumulate=s >= 3)
                trace[r].append((c.alpha, c.P.clone(), c.bu.clone()))
            out[r] = c
        except BaseException as e:  # surfaced below; the other rank's barrier is released
            errors.append(e)
            summer.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (a0, p0, b0), (a1, p1, b1) in zip(*trace, strict=True):
        assert a0 == a1 and torch.equal(p0, p1) and torch.equal(b0, b1)
    st = [c.mean_state(rank) for c in out]
    assert torch.equal(st[0]["user_factors"], st[1]["user_factors"])
    merged = BiasedMF.from_state(dict(st[0], item_factors=torch.cat([x["item_factors"] for x in st]),
                                      item_bias=torch.cat([x["item_bias"] for x in st])))
    sharded = rmse(merged)
    assert abs(sharded - single) < 0.01, (sharded, single)
    assert abs(out[0].noise_sigma - sigma) < 0.1 * sigma
    # the pooled basis is an orthonormal basis of the stacked rows, also when they repeat
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :1] * 2], 1)  # a dependent column
    parts = [x[:20], x[20:]]
    ident = _ThreadSum(1).of_rank(0)
    q_all, r_all = pooled_basis(x, ident)
    assert r_all.shape == (4, 5)
    torch.testing.assert_close(q_all.T @ q_all, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(q_all @ r_all, x)
    gram_sum = lambda t: t.copy_(parts[0].T @ parts[0] + parts[1].T @ parts[1])  # noqa: E731
    q0, r0 = pooled_basis(parts[0], gram_sum)
    q1, _ = pooled_basis(parts[1], gram_sum)
    torch.testing.assert_close(torch.cat([q0, q1]), q_all)
    torch.testing.assert_close(q0 @ r0, parts[0])
