"""Bayesian biased MF by Gibbs sampling (BPMF with biases), batched on the device.

The model is the one every solver trains, r = μ + b_u + b_i + p_u·q_i + ε with
ε ~ N(0, 1/α), given priors instead of fixed penalties (Salakhutdinov & Mnih, "Bayesian
probabilistic matrix factorization using MCMC", 2008, extended with biases):

    p_u ~ N(m_P, Λ_P⁻¹),  q_i ~ N(m_Q, Λ_Q⁻¹)        (m, Λ) ~ Normal-Wishart(0, β₀, w₀·I, ν₀ = d)
    b_u ~ N(0, 1/τ_u),    b_i ~ N(0, 1/τ_i)          τ ~ Gamma(a₀, b₀)
    α ~ Gamma(a₀, b₀)                                 (or fixed: ``GibbsPriors.noise_precision``)

A sweep samples the hyperparameters of the user side from the current user rows, then every
user's ``[p_u, b_u]`` from its Gaussian conditional given the items — the same normal
equations as ALS (:func:`svdfill.kernels.als.chunk_augmented_equations`), with the prior's
precision in place of the penalty, solved by one batched Cholesky per group of chunks — then
the same for items, then α from the residuals. Nothing is tuned per dataset beyond the priors and d:
the data set the amount of shrinkage, which is why the posterior mean beats a tuned MAP fit
(ALS) on MovieLens.

Prediction is the posterior mean of r̂, estimated by averaging over sweeps after burn-in. Each
sweep contributes the Rao-Blackwellized estimate ``½(E[P | Q] Qᵀ + P E[Q | P]ᵀ)`` (conditional
means computed anyway by the solves), which has lower variance than the raw sample. The
average of many rank-d products is not rank d, but on MovieLens its rank-d truncation scores
the same as the full average (measured: ML-1M, d = 32, the truncated SVD at rank 32 and at
rank 512 give the same validation RMSE to 1e-4), so :class:`LowRankMean` keeps a running
rank-r SVD of it (r = 2d by default, exported at d) and the exported model is one ordinary
biased MF of the configured width: same checkpoint, same fill.

Item-sharded worlds (``GibbsChain(shard_sum=...)``: torchrun, Ray Train): each rank holds
its items' rows and ratings. The users' conditionals need every rank's ratings, so their
normal equations are summed across ranks block by block of user ids (as ALS does), and
every rank draws the same user rows from the same summed systems with the same noise; the
items are drawn locally with the rank's own noise. The hyperparameters and α come from
moments and residual sums pooled over the ranks and are drawn from one shared stream, so
they agree everywhere; the posterior mean's column basis is orthonormalized from the
pooled Gram matrix instead of a local QR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from svdfill.kernels.als import (DEFAULT_BUDGET_ELEMENTS, buffer, group_equations, rating_plan,
                                 side_features, side_features_augmented, side_groups,
                                 side_workspace, summed_user_equations, user_blocks)


@dataclass(frozen=True)
class GibbsPriors:
    """Hyperpriors of the sampler (the BPMF paper's defaults)."""

    beta0: float = 2.0
    """Normal-Wishart: prior strength of the factor mean m (its precision is β₀·Λ)."""
    w0: float = 1.0
    """Normal-Wishart: scale matrix W₀ = w₀·I of the factor precision Λ."""
    nu0: float = 0.0
    """Normal-Wishart degrees of freedom ν₀; 0 = d (must be > d − 1)."""
    a0: float = 1.0
    """Gamma shape of the bias and noise precision priors."""
    b0: float = 1.0
    """Gamma rate of the bias and noise precision priors."""
    noise_precision: float = 0.0
    """α > 0 fixes the noise precision (BPMF used 2); 0 samples it."""


# -- hyperparameters (d×d, float64, on the host) -----------------------------------------------

def sample_wishart(rng: np.random.Generator, scale: np.ndarray, dof: float) -> np.ndarray:
    """One draw of Wishart(``scale`` [d, d] SPD, ``dof`` > d − 1) by the Bartlett
    decomposition; float64 [d, d]. Its mean is ``dof · scale``."""
    d = scale.shape[0]
    if dof <= d - 1:
        raise ValueError(f"sample_wishart: dof must exceed d - 1 = {d - 1}, got {dof}")
    chol = np.linalg.cholesky(scale)
    a = np.zeros((d, d))
    a[np.diag_indices(d)] = np.sqrt(rng.chisquare(dof - np.arange(d)))
    low = np.tril_indices(d, -1)
    a[low] = rng.standard_normal(len(low[0]))
    la = chol @ a
    return la @ la.T


def row_moments(x: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """``(N, mean [d], scatter [d, d])`` of the rows of ``x`` [N, d] (any device), with
    ``scatter = Σ (x − mean)(x − mean)ᵀ``; float64 on the host (the reduction runs on
    ``x``'s device, so only d×d numbers move)."""
    n = int(x.shape[0])
    if n == 0:
        d = int(x.shape[1])
        return 0, np.zeros(d), np.zeros((d, d))
    x64 = x.to(torch.float64)
    mean = x64.mean(0)
    c = x64 - mean
    return n, mean.cpu().numpy(), (c.T @ c).cpu().numpy()


def pooled_moments(x: torch.Tensor, shard_sum) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`row_moments` of the rows of every rank's ``x`` [N_r, d] together: counts, sums
    and cross products summed by ``shard_sum`` (one float64 tensor of 1 + d + d² numbers)."""
    d = int(x.shape[1])
    x64 = x.to(torch.float64)
    packed = torch.cat([x64.new_tensor([float(x.shape[0])]), x64.sum(0), (x64.T @ x64).reshape(-1)])
    shard_sum(packed)
    packed = packed.cpu().numpy()
    n = int(round(packed[0]))
    if n == 0:
        return 0, np.zeros(d), np.zeros((d, d))
    mean = packed[1:1 + d] / n
    scatter = packed[1 + d:].reshape(d, d) - n * np.outer(mean, mean)
    return n, mean, (scatter + scatter.T) / 2


def sample_normal_wishart(rng: np.random.Generator, n: int, mean: np.ndarray, scatter: np.ndarray,
                          priors: GibbsPriors) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``(m [d], Λ [d, d])`` from the Normal-Wishart posterior given ``n`` rows with
    sample ``mean`` and ``scatter`` (:func:`row_moments`); prior mean 0. float64."""
    d = mean.shape[0]
    nu0 = priors.nu0 if priors.nu0 > 0 else float(d)
    beta_n = priors.beta0 + n
    mean_n = n * mean / beta_n
    w_inv = np.eye(d) / priors.w0 + scatter + (priors.beta0 * n / beta_n) * np.outer(mean, mean)
    w = np.linalg.inv(w_inv)
    lam = sample_wishart(rng, (w + w.T) / 2, nu0 + n)
    lam = (lam + lam.T) / 2
    # m ~ N(mean_n, (β_n Λ)⁻¹): solve with Λ's Cholesky factor instead of inverting it
    chol = np.linalg.cholesky(beta_n * lam)
    m = mean_n + np.linalg.solve(chol.T, rng.standard_normal(d))
    return m, lam


def sample_precision(rng: np.random.Generator, n: int, sum_sq: float, priors: GibbsPriors) -> float:
    """Gamma posterior draw of a precision given ``n`` zero-mean residuals with sum of squares
    ``sum_sq`` (prior Gamma(a₀, rate b₀))."""
    return float(rng.gamma(priors.a0 + 0.5 * n, 1.0 / (priors.b0 + 0.5 * sum_sq)))


# -- the per-row conditionals (batched on the device) ----------------------------------------------

@torch.no_grad()
def sample_side(own_f: torch.Tensor, own_b: torch.Tensor, fixed_f: torch.Tensor,
                fixed_b: torch.Tensor, centered: torch.Tensor, side, *, alpha: float,
                prior_mean: torch.Tensor, prior_prec: torch.Tensor, bias_prec: float,
                generator: torch.Generator | None, budget: int = DEFAULT_BUDGET_ELEMENTS,
                mean_f: torch.Tensor | None = None, mean_b: torch.Tensor | None = None,
                overrelax: float = 0.0, with_targets: bool = False) -> float:
    """Replace ``[own_f, own_b]`` of every row with ratings by a draw from its conditional

        N(A⁻¹h, A⁻¹),  A = α ZᵀZ + blockdiag(Λ, τ),  h = α Zᵀ(r − μ − b_fixed) + [Λ m, 0]

    where ``Z = [fixed_f, 1]`` are the features of the row's rated columns, in place.

    own_f [R, d], own_b [R]; fixed_f [C, d], fixed_b [C] (float32, one device); centered
    [n+1] = ratings − μ with a trailing 0; ``side`` a :func:`~svdfill.kernels.als.rating_plan`
    side; prior_mean [d], prior_prec [d, d] (float, any device); ``generator`` draws the
    noise (``None`` = the conditional mean itself, no noise). ``mean_f``/``mean_b`` (shaped
    like own_f/own_b) receive the conditional means when given. Rows without ratings are
    left untouched. ``overrelax`` = ρ ∈ (−1, 1) draws ``m + ρ(x − m) + √(1−ρ²)·L⁻ᵀε`` from the
    current rows ``x`` instead (Adler 1981): the conditional stays invariant, and ρ < 0 makes
    successive draws anticorrelated, so averages over the chain converge in fewer sweeps
    (ML-100K: ρ = −0.9 reaches in 30 sweeps the posterior-mean RMSE plain Gibbs has after 100).

    The rows are drawn a group of chunks at a time (:func:`~svdfill.kernels.als.side_groups`:
    one batched Cholesky, one noise call, one host sync per group) from augmented Grams
    ``[Z, y]ᵀ[Z, y]`` (:func:`~svdfill.kernels.als.chunk_augmented_equations`).

    Returns ``Σ_rows (xᵀZᵀZ x − 2 xᵀZᵀy)`` of the new draws ``x`` (float64 sum), from the
    normal equations already built; with ``with_targets`` plus ``Σ yᵀy``, i.e. the residual
    sum of squares ``Σ (y − Z x)²`` that the noise precision needs, without another pass
    over the ratings. Raises ``FloatingPointError`` when a conditional is not positive
    definite (NaN/inf in the inputs).
    """
    k = fixed_f.shape[1] + 1
    feats_aug = side_features_augmented(fixed_f, fixed_b)
    prior = _prior_terms(own_f, prior_mean, prior_prec, bias_prec)
    fit = torch.zeros((), dtype=torch.float64, device=own_f.device)
    ws = side_workspace(side, own_f.device)
    for group in side_groups(side, k, budget):
        aug = group_equations(feats_aug, centered, group, budget, ws)
        x = _draw_solutions(aug[:, :k, :k], aug[:, :k, k:], group.rows, own_f, own_b, prior,
                            alpha, generator, overrelax, mean_f, mean_b, ws)
        # [x; −1]ᵀ [[G, r], [rᵀ, yᵀy]] [x; −1] = xᵀGx − 2xᵀr + yᵀy: one bmm on the
        # contiguous augmented Gram
        v = torch.cat([x, x.new_full((x.shape[0], 1, 1), -1.0)], 1)
        fit += (torch.bmm(aug, v) * v).sum(dtype=torch.float64)
        if not with_targets:
            fit -= aug[:, k, k].sum(dtype=torch.float64)
    if not bool(torch.isfinite(own_f).all()):
        raise FloatingPointError("gibbs: non-finite draw (NaN/inf in ratings or factors?)")
    return float(fit)


@torch.no_grad()
def sample_users_summed(own_f: torch.Tensor, own_b: torch.Tensor, fixed_f: torch.Tensor,
                        fixed_b: torch.Tensor, centered: torch.Tensor, blocks, shard_sum,
                        counts: torch.Tensor, *, alpha: float, prior_mean: torch.Tensor,
                        prior_prec: torch.Tensor, bias_prec: float,
                        generator: torch.Generator | None, budget: int = DEFAULT_BUDGET_ELEMENTS,
                        mean_f: torch.Tensor | None = None, mean_b: torch.Tensor | None = None,
                        overrelax: float = 0.0) -> None:
    """:func:`sample_side` for the replicated users of an item-sharded world: per block of
    :func:`~svdfill.kernels.als.user_blocks`, this rank's partial normal equations summed
    over the ranks by ``shard_sum``, then the draws of the users with ``counts [U] > 0``
    (global rating counts) — the same on every rank given the same ``generator`` seed."""
    feats, fbias = side_features(fixed_f, fixed_b)
    prior = _prior_terms(own_f, prior_mean, prior_prec, bias_prec)
    for rows, gram, rhs in summed_user_equations(feats, fbias, centered, blocks, shard_sum,
                                                 counts, budget):
        _draw_rows(gram, rhs, rows, own_f, own_b, prior, alpha, generator, overrelax, mean_f,
                   mean_b)
    if not bool(torch.isfinite(own_f).all()):
        raise FloatingPointError("gibbs: non-finite draw (NaN/inf in ratings or factors?)")


def _prior_terms(own_f: torch.Tensor, prior_mean: torch.Tensor, prior_prec: torch.Tensor,
                 bias_prec: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's precision ``blockdiag(Λ, τ)`` [k, k] and ``[Λ m, 0]`` [k] on own_f's device."""
    d = own_f.shape[1]
    k = d + 1
    dev, dtype = own_f.device, own_f.dtype
    p0 = torch.zeros(k, k, device=dev, dtype=dtype)
    p0[:d, :d] = prior_prec.to(dev, dtype)
    p0[d, d] = bias_prec
    h0 = torch.zeros(k, device=dev, dtype=dtype)
    h0[:d] = (prior_prec.to(torch.float64) @ prior_mean.to(torch.float64)).to(dev, dtype)
    return p0, h0


def _draw_rows(gram, rhs, rows, own_f, own_b, prior, alpha, generator, overrelax, mean_f,
               mean_b) -> torch.Tensor:
    """Draw ``rows`` of ``[own_f, own_b]`` from their conditionals given their normal
    equations ``gram [B, k, k]``, ``rhs [B, k, 1]``; returns their ``Σ (xᵀGx − 2xᵀr)``
    (float64, 0-d)."""
    draw = _draw_solutions(gram, rhs, rows, own_f, own_b, prior, alpha, generator, overrelax,
                           mean_f, mean_b)
    return ((torch.bmm(gram, draw) - 2 * rhs) * draw).sum(dtype=torch.float64)


def _draw_solutions(gram, rhs, rows, own_f, own_b, prior, alpha, generator, overrelax, mean_f,
                    mean_b, ws: dict | None = None) -> torch.Tensor:
    """Draw ``rows`` of ``[own_f, own_b]`` (written in place, conditional means into
    ``mean_f``/``mean_b`` when given) from their conditionals given ``gram [B, k, k]``,
    ``rhs [B, k, 1]`` (views are fine); returns the draws ``[B, k, 1]``. ``ws``: a
    :func:`~svdfill.kernels.als.side_workspace` for the ``[B, k, k]`` temporaries."""
    p0, h0 = prior
    d = own_f.shape[1]
    dev, dtype = own_f.device, own_f.dtype
    b, k = gram.shape[0], gram.shape[1]
    prec = torch.add(p0, gram, alpha=alpha, out=buffer(ws, "prec", (b, k, k), gram))
    h = torch.add(h0[:, None], rhs, alpha=alpha)
    # (not out=prec: LAPACK's column-major copy makes the in-place factor slower, measured)
    chol, info = torch.linalg.cholesky_ex(prec)
    if bool((info != 0).any()):
        raise FloatingPointError("gibbs: a conditional precision is not positive definite "
                                 "(NaN/inf in ratings or factors?)")
    # A = L Lᵀ: mean = L⁻ᵀ(L⁻¹h) and a draw = L⁻ᵀ(L⁻¹h + ε), in one back substitution
    y = torch.linalg.solve_triangular(chol, h, upper=False)
    if generator is not None:
        eps = torch.randn(y.shape, generator=generator, device=dev, dtype=dtype)
        if overrelax:
            # Adler's over-relaxation: x' = m + ρ(x − m) + √(1−ρ²) L⁻ᵀε, i.e. in the
            # whitened frame Lᵀx: ρ·Lᵀx + (1−ρ)·L⁻¹h + √(1−ρ²)·ε (keeps the conditional)
            old = torch.cat([own_f[rows], own_b[rows, None]], 1).unsqueeze(2)
            lt_old = torch.bmm(chol.transpose(1, 2), old)
            eps = overrelax * lt_old - overrelax * y + math.sqrt(1 - overrelax ** 2) * eps
        y = torch.cat([y + eps, y], dim=2) if mean_f is not None else y + eps
    x = torch.linalg.solve_triangular(chol.transpose(1, 2), y, upper=True)
    draw = x[:, :, :1]
    own_f[rows] = x[:, :d, 0]
    own_b[rows] = x[:, d, 0]
    if mean_f is not None:
        mean_f[rows] = x[:, :d, -1]
        mean_b[rows] = x[:, d, -1]
    return draw


# -- the running posterior mean as a rank-r SVD ----------------------------------------------------

def pooled_basis(x: torch.Tensor, col_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_r, R)`` with ``x_r = Q_r R`` on every rank r, the stacked ``Q_r`` orthonormal:
    the QR of a matrix whose rows are spread over the ranks (``x`` [N_r, m] here), from the
    eigendecomposition of the pooled float64 Gram ``Σ_r x_rᵀ x_r`` (summed by ``col_sum``,
    the same on every rank, so every rank picks the same basis). Directions with
    eigenvalue below 1e-12 of the largest (singular values below 1e-6) are dropped, so
    ``R`` is [m', m] with m' ≤ m: a rank-deficient x (repeated samples) costs nothing."""
    x64 = x.to(torch.float64)
    gram = x64.T @ x64
    col_sum(gram)
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > max(float(evals.max()), 0.0) * 1e-12
    if not bool(keep.any()):
        keep = evals >= evals.max()
    root = evals[keep].clamp_min(0).sqrt()
    vk = evecs[:, keep]
    q = (x64 @ (vk / root.clamp_min(1e-300))).to(x.dtype)
    return q, (vk * root).T.to(x.dtype)


class LowRankMean:
    """Running mean of matrices ``Σ_j A_j B_jᵀ`` (one sample per :meth:`add`), kept as a
    truncated SVD ``U diag(s) Vᵀ`` of rank ≤ ``rank``: ``U [R, r]``, ``V [C, r]`` with
    orthonormal columns, ``s [r]`` descending; float32 on the factors' device. Exact (up to
    rounding) while the total rank stays ≤ ``rank``; beyond, each update keeps the best
    rank-``rank`` approximation of (old mean + new sample).

    With ``col_sum`` (an in-place sum over the ranks of an item-sharded world) the columns
    are this rank's rows of ``V`` and ``B_j`` only, ``n_cols_total`` counts all of them, and
    the column basis is orthonormalized from the pooled Gram matrix (:func:`pooled_basis`)."""

    def __init__(self, n_rows: int, n_cols: int, rank: int, device, dtype=torch.float32,
                 col_sum=None, n_cols_total: int | None = None):
        if rank < 1:
            raise ValueError(f"LowRankMean: rank must be >= 1, got {rank}")
        self.col_sum = col_sum
        total = n_cols if n_cols_total is None else int(n_cols_total)
        self.rank = int(min(rank, n_rows, total)) or 1
        self.count = 0
        self.u = torch.zeros(n_rows, 0, device=device, dtype=dtype)
        self.s = torch.zeros(0, device=device, dtype=dtype)
        self.v = torch.zeros(n_cols, 0, device=device, dtype=dtype)

    @torch.no_grad()
    def add(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add one sample, the mean of ``A_j B_jᵀ`` over ``pairs`` (``A_j [R, d_j]``,
        ``B_j [C, d_j]``), to the running mean."""
        t = self.count
        w = 1.0 / ((t + 1) * len(pairs))
        left = torch.cat([self.u * (self.s * (t / (t + 1)))] + [a * w for a, _ in pairs], dim=1)
        right = torch.cat([self.v] + [b for _, b in pairs], dim=1)
        ql, rl = torch.linalg.qr(left)
        qr, rr = (torch.linalg.qr(right) if self.col_sum is None
                  else pooled_basis(right, self.col_sum))
        core = rl @ rr.T
        x, sig, yt = torch.linalg.svd(core)
        r = min(self.rank, sig.shape[0])
        self.u = ql @ x[:, :r]
        self.s = sig[:r].clone()
        self.v = qr @ yt[:r].T
        self.count = t + 1

    def factors(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P [R, d], Q [C, d])`` with ``P Qᵀ`` the best rank-d part of the mean, split as
        ``U√s``, ``V√s``; zero columns where the mean has rank < d."""
        r = min(d, self.s.shape[0])
        root = self.s[:r].clamp_min(0).sqrt()
        p = self.u.new_zeros(self.u.shape[0], d)
        q = self.v.new_zeros(self.v.shape[0], d)
        p[:, :r] = self.u[:, :r] * root
        q[:, :r] = self.v[:, :r] * root
        return p, q

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "s": self.s, "v": self.v, "count": torch.tensor(self.count),
                "rank": torch.tensor(self.rank)}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        dev = self.u.device
        self.u, self.s, self.v = (st[k].to(dev, self.u.dtype).clone() for k in ("u", "s", "v"))
        self.count, self.rank = int(st["count"]), int(st["rank"])


# -- the chain ------------------------------------------------------------------------------------------

ITEM_STATE_KEYS = ("Q", "bi", "sum_bi", "mean.v")
"""The keys of :meth:`GibbsChain.state` whose rows are items (an item shard's own rows)."""


class GibbsChain:
    """The sampler's state for one training run: the current draw ``P [U, d]``, ``Q [I, d]``,
    ``b_u [U]``, ``b_i [I]`` (float32, on ``device``), the noise precision α, and the running
    posterior mean (:class:`LowRankMean` of the factor part, running sums of the biases).

    ``sweep`` is deterministic given its ``seed`` (noise on the device from a generator seeded
    with it, hyperparameters on the host from ``numpy.random.default_rng(seed)``), so a chain
    restored with :meth:`load_state` and continued with the same per-sweep seeds equals an
    uninterrupted one.

    On an item shard (``state``'s item tables are this rank's rows): ``shard_sum`` sums a
    float tensor in place over the ranks, ``user_counts [U]`` are the global rating counts,
    ``n_items_total`` the catalogue's size and ``rank`` this rank (its item noise stream).
    Every rank passes the same ``seed`` to :meth:`sweep`. :meth:`state` then holds this
    rank's rows of :data:`ITEM_STATE_KEYS`.
    """

    def __init__(self, state: dict[str, torch.Tensor], *, alpha: float, priors: GibbsPriors,
                 mean_rank: int, budget: int = DEFAULT_BUDGET_ELEMENTS, overrelax: float = 0.0,
                 shard_sum=None, user_counts: torch.Tensor | None = None,
                 n_items_total: int | None = None, rank: int = 0):
        if (shard_sum is None) != (user_counts is None):
            raise ValueError("GibbsChain: shard_sum and user_counts go together")
        self.shard_sum, self.rank = shard_sum, int(rank)
        self.overrelax = float(overrelax)
        self.P = state["user_factors"].detach().clone()
        self.Q = state["item_factors"].detach().clone()
        self.bu = state["user_bias"].detach().clone()
        self.bi = state["item_bias"].detach().clone()
        self.mu = float(state["global_mean"])
        self.alpha = float(alpha)
        self.priors = priors
        self.budget = int(budget)
        dev = self.P.device
        self.user_counts = None if user_counts is None else user_counts.to(dev)
        self.mean = LowRankMean(self.P.shape[0], self.Q.shape[0], mean_rank, dev,
                                col_sum=shard_sum, n_cols_total=n_items_total)
        self.sum_bu = torch.zeros_like(self.bu, dtype=torch.float64)
        self.sum_bi = torch.zeros_like(self.bi, dtype=torch.float64)

    @property
    def samples(self) -> int:
        """Sweeps averaged into the posterior mean so far."""
        return self.mean.count

    @torch.no_grad()
    def sweep(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *, seed: int,
              accumulate: bool) -> None:
        """One Gibbs sweep over all users, then all items, then α; with ``accumulate`` its
        Rao-Blackwellized estimate joins the posterior mean. users/items int64 [n] on the
        chain's device, ratings float32 [n]."""
        dev = self.P.device
        d = self.P.shape[1]
        plan = rating_plan(users, items, self.P.shape[0], self.Q.shape[0], d + 1, dev, self.budget)
        centered = torch.cat([ratings.to(dev, torch.float32) - self.mu,
                              torch.zeros(1, device=dev, dtype=torch.float32)])
        rng = np.random.default_rng(seed)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        mean_p = torch.zeros_like(self.P) if accumulate else None
        mean_bu = torch.zeros_like(self.bu) if accumulate else None
        if self.shard_sum is None:
            self._sample(self.P, self.bu, self.Q, self.bi, centered, plan.user_side, rng, gen,
                         mean_p, mean_bu)
        else:
            self._sample_users_sharded(users, items, plan, centered, rng, gen, mean_p, mean_bu)
            if self.rank:  # the items' noise: one stream per rank (rank 0 goes on with gen's)
                gen = torch.Generator(device=dev)
                gen.manual_seed((seed * 1_000_003 + self.rank * 7_919) % (2**63 - 1))
        if accumulate:
            q_prev, bi_prev = self.Q.clone(), self.bi.clone()
            mean_q, mean_bi = torch.zeros_like(self.Q), torch.zeros_like(self.bi)
        else:
            mean_q = mean_bi = None
        sse = self._sample(self.Q, self.bi, self.P, self.bu, centered, plan.item_side, rng, gen,
                           mean_q, mean_bi)
        if self.priors.noise_precision > 0:
            self.alpha = float(self.priors.noise_precision)
        else:
            n = ratings.numel()
            if self.shard_sum is not None:  # every rank's ratings: one α for all
                both = torch.tensor([float(n), sse], dtype=torch.float64, device=dev)
                self.shard_sum(both)
                n, sse = int(round(float(both[0]))), float(both[1])
            self.alpha = sample_precision(rng, int(n), max(sse, 0.0), self.priors)
        if accumulate:
            self.mean.add([(mean_p, q_prev), (self.P, mean_q)])
            self.sum_bu += 0.5 * (mean_bu.double() + self.bu.double())
            self.sum_bi += 0.5 * (bi_prev.double() + mean_bi.double())

    def _sample(self, own_f, own_b, fixed_f, fixed_b, centered, side, rng, gen, mean_f, mean_b) -> float:
        """Draw one side's hyperparameters, then its rows; returns the residual sum of squares
        of its ratings under the new draws."""
        rows = torch.cat([ch.rows for ch in side.chunks]) if side.chunks else own_f.new_zeros(0, dtype=torch.int64)
        if self.shard_sum is None:
            n, m, scatter = row_moments(own_f[rows])
            sq = float(own_b[rows].double().pow(2).sum())
        else:  # this rank's item rows: the hyperparameters see every rank's
            n, m, scatter = pooled_moments(own_f[rows], self.shard_sum)
            sq_t = own_b[rows].double().pow(2).sum().reshape(1)
            self.shard_sum(sq_t)
            sq = float(sq_t[0])
        return sample_side(own_f, own_b, fixed_f, fixed_b, centered, side, with_targets=True,
                           **self._conditional_args(rng, n, m, scatter, sq, gen, mean_f, mean_b))

    def _sample_users_sharded(self, users, items, plan, centered, rng, gen, mean_p, mean_bu) -> None:
        """The replicated users' hyperparameters and draws (the same on every rank)."""
        rows = torch.nonzero(self.user_counts > 0).squeeze(1)
        n, m, scatter = row_moments(self.P[rows])
        sq = float(self.bu[rows].double().pow(2).sum())
        blocks = user_blocks(plan, users, items, self.P.shape[0], self.P.shape[1] + 1,
                             self.P.device, self.budget)
        sample_users_summed(self.P, self.bu, self.Q, self.bi, centered, blocks, self.shard_sum,
                            self.user_counts,
                            **self._conditional_args(rng, n, m, scatter, sq, gen, mean_p, mean_bu))

    def _conditional_args(self, rng, n, mean, scatter, bias_sq, gen, mean_f, mean_b) -> dict:
        """One side's hyperparameters drawn from its rows' moments (``n``, ``mean``,
        ``scatter``, bias sum of squares ``bias_sq``), with the rest of what its draws take."""
        prior_mean, prior_prec = sample_normal_wishart(rng, n, mean, scatter, self.priors)
        bias_prec = sample_precision(rng, n, bias_sq, self.priors)
        return {"alpha": self.alpha, "prior_mean": torch.from_numpy(prior_mean),
                "prior_prec": torch.from_numpy(prior_prec), "bias_prec": bias_prec,
                "generator": gen, "budget": self.budget, "mean_f": mean_f, "mean_b": mean_b,
                "overrelax": self.overrelax}

    def current_state(self) -> dict[str, torch.Tensor]:
        """The current draw as the five model tensors."""
        return {"user_factors": self.P, "item_factors": self.Q, "user_bias": self.bu,
                "item_bias": self.bi, "global_mean": torch.tensor(self.mu, dtype=torch.float32)}

    def mean_state(self, d: int) -> dict[str, torch.Tensor]:
        """The posterior-mean model as the five tensors of a width-``d`` biased MF (the
        current draw while nothing has been averaged yet)."""
        if self.samples == 0:
            return self.current_state()
        p, q = self.mean.factors(d)
        return {"user_factors": p, "item_factors": q,
                "user_bias": (self.sum_bu / self.samples).to(torch.float32),
                "item_bias": (self.sum_bi / self.samples).to(torch.float32),
                "global_mean": torch.tensor(self.mu, dtype=torch.float32)}

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a resumed chain needs (tensors only: loads with ``weights_only``)."""
        return {"P": self.P, "Q": self.Q, "bu": self.bu, "bi": self.bi,
                "alpha": torch.tensor(self.alpha, dtype=torch.float64),
                "sum_bu": self.sum_bu, "sum_bi": self.sum_bi,
                **{f"mean.{k}": v for k, v in self.mean.state().items()}}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        dev = self.P.device
        for k in ("P", "Q", "bu", "bi", "sum_bu", "sum_bi"):
            setattr(self, k, st[k].to(dev).clone())
        self.alpha = float(st["alpha"])
        self.mean.load({k[5:]: v for k, v in st.items() if k.startswith("mean.")})

    @property
    def noise_sigma(self) -> float:
        return 1.0 / math.sqrt(self.alpha)
