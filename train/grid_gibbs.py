"""Bayesian MF by Gibbs sampling on the grid layout (``[dist] layout = "grid"``,
``train.solver = "gibbs"``): the chain of :mod:`svdfill.kernels.gibbs` with both sides
block-distributed.

A sweep is the one-process sweep with the row exchange of grid ALS
(:class:`~svdfill.train.grid_als.GridALSSolver`): the user side's hyperparameters are drawn
from the users' moments pooled over the ranks (``pooled_moments``, one all-reduce of
``1 + d + d²`` numbers; the bias sum of squares likewise), every user of the block is drawn
from its conditional given the fetched item rows (``sample_side``), then the same for the
items given the fetched new user rows, then the noise precision from the residual sums
all-reduced. Hyperparameters come from one host stream seeded by the sweep's seed, the same
on every rank, so they agree everywhere; the row noise comes from per-rank streams seeded by
``(sweep seed, rank, side)``. The chain is therefore statistically equivalent to the
one-process chain (same conditionals, same priors, same warm start), not bit-equal to it.

The posterior mean is the Rao-Blackwellized running mean of :class:`LowRankMean`, whose row
and column bases are both orthonormalized from pooled Gram matrices (:func:`pooled_basis`):
its left factor lives on the user blocks, its right factor on the item blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from svdfill.kernels.gibbs import (GibbsPriors, LowRankMean, pooled_basis, pooled_moments,
                                   sample_normal_wishart, sample_precision, sample_side)
from svdfill.kernels.half_sweep import table
from svdfill.train.grid_als import GridALSSolver


class GridLowRankMean(LowRankMean):
    """:class:`LowRankMean` whose rows (user blocks) and columns (item blocks) are both
    spread over the ranks: ``total_sum`` sums a tensor in place over every rank."""

    def __init__(self, n_rows: int, n_cols: int, rank: int, device, total_sum,
                 n_rows_total: int, n_cols_total: int):
        super().__init__(n_rows, n_cols, rank, device, col_sum=total_sum,
                         n_cols_total=n_cols_total)
        self.rank = int(min(rank, n_rows_total, n_cols_total)) or 1

    @torch.no_grad()
    def add(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        t = self.count
        w = 1.0 / ((t + 1) * len(pairs))
        left = torch.cat([self.u * (self.s * (t / (t + 1)))] + [a * w for a, _ in pairs], dim=1)
        right = torch.cat([self.v] + [b for _, b in pairs], dim=1)
        ql, rl = pooled_basis(left, self.col_sum)
        qr, rr = pooled_basis(right, self.col_sum)
        x, sig, yt = torch.linalg.svd(rl @ rr.T)
        r = min(self.rank, sig.shape[0])
        self.u = ql @ x[:, :r]
        self.s = sig[:r].clone()
        self.v = qr @ yt[:r].T
        self.count = t + 1


class GridGibbsSolver(GridALSSolver):
    """The chain on one rank: its draws ``P, b_u`` (user block) and ``Q, b_i`` (item
    block), and the posterior mean, exported into the block tables of
    :class:`GridALSSolver` (what evaluation and checkpoints read) after every sweep."""

    name = "gibbs"

    def __init__(self, cfg, world, shard):
        super().__init__(cfg, world, shard)
        self.chain_started = False
        self.samples = 0
        self.alpha = 2.0

    def _start(self, warm: bool = True) -> None:
        """Warm-start sweeps (unless ``warm`` is False: a checkpoint restores the chain),
        then the chain from the block tables."""
        g = self.cfg.train.gibbs
        self.alpha = g.noise_precision or 2.0
        if warm and g.warm_start > 0:
            for _ in range(g.warm_start):
                GridALSSolver.run_epoch(self, "select", 0, False)
            mse = self.evaluate("train")["mse"]
            if not g.noise_precision and mse > 0:
                self.alpha = 1.0 / mse
        self.priors = GibbsPriors(beta0=g.beta0, w0=g.w0, noise_precision=g.noise_precision)
        self.P, self.bu = self.user_factors.clone(), self.user_bias.clone()
        self.Q, self.bi = self.item_factors.clone(), self.item_bias.clone()
        lay = self.shard.layout
        self.mean = GridLowRankMean(self.P.shape[0], self.Q.shape[0],
                                    g.mean_rank or 2 * self.d, self.P.device,
                                    self.world.all_reduce_sum, lay.n_users, lay.n_items)
        self.sum_bu = torch.zeros_like(self.bu, dtype=torch.float64)
        self.sum_bi = torch.zeros_like(self.bi, dtype=torch.float64)
        self.centered = {}
        for name, side in (("user", self.user_side), ("item", self.item_side)):
            c = side.ratings - torch.tensor(self.mu32, dtype=torch.float32, device=side.ratings.device)
            self.centered[name] = torch.cat([c, c.new_zeros(1)])
        self.chain_started = True

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        from svdfill.train.shard import phase_seed

        if not self.chain_started:
            self._start()
        g = self.cfg.train.gibbs
        seed = phase_seed(self.cfg.train.seed, phase, epoch, 0)
        accumulate = epoch > g.burn_in
        rng = np.random.default_rng(seed)  # hyperparameters: the same stream on every rank
        dev = self.P.device
        s0 = self.ex_items.bytes_sent + self.ex_users.bytes_sent
        r0 = self.ex_items.bytes_received + self.ex_users.bytes_received

        mean_p = torch.zeros_like(self.P) if accumulate else None
        mean_bu = torch.zeros_like(self.bu) if accumulate else None
        items = self.ex_items.fetch(table(self.Q, self.bi))
        self._draw(self.P, self.bu, items, self.user_side, self.centered["user"], rng,
                   self._gen(seed, 1, dev), mean_p, mean_bu)
        del items
        if accumulate:
            q_prev, bi_prev = self.Q.clone(), self.bi.clone()
            mean_q, mean_bi = torch.zeros_like(self.Q), torch.zeros_like(self.bi)
        else:
            mean_q = mean_bi = None
        users = self.ex_users.fetch(table(self.P, self.bu))
        sse = self._draw(self.Q, self.bi, users, self.item_side, self.centered["item"], rng,
                         self._gen(seed, 2, dev), mean_q, mean_bi)
        del users
        if self.priors.noise_precision > 0:
            self.alpha = float(self.priors.noise_precision)
        else:
            both = torch.tensor([float(self.item_side.ratings.numel()), sse], dtype=torch.float64)
            self.world.all_reduce_sum(both)
            self.alpha = sample_precision(rng, int(round(float(both[0]))), max(float(both[1]), 0.0),
                                          self.priors)
        if accumulate:
            self.mean.add([(mean_p, q_prev), (self.P, mean_q)])
            self.sum_bu += 0.5 * (mean_bu.double() + self.bu.double())
            self.sum_bi += 0.5 * (bi_prev.double() + mean_bi.double())
            self.samples += 1
        self._export()
        sent = self.ex_items.bytes_sent + self.ex_users.bytes_sent - s0
        recv = self.ex_items.bytes_received + self.ex_users.bytes_received - r0
        self.bytes["sweep_sent"] += sent
        self.bytes["sweep_received"] += recv
        self._last_sweep = (sent, recv)

    def _gen(self, seed: int, side: int, dev) -> torch.Generator:
        """The row noise of one side of one sweep on this rank."""
        gen = torch.Generator(device=dev)
        gen.manual_seed((seed * 1_000_003 + self.world.rank * 7_919 + side * 104_729) % (2**63 - 1))
        return gen

    def _draw(self, own_f, own_b, fetched, block, centered, rng, gen, mean_f, mean_b) -> float:
        """One side's hyperparameters (moments pooled over the ranks), then its rows; returns
        this rank's residual sum of squares under the new draws."""
        rated = block.counts > 0
        n, m, scatter = pooled_moments(own_f[rated], self.world.all_reduce_sum)
        sq_t = own_b[rated].double().pow(2).sum().reshape(1)
        self.world.all_reduce_sum(sq_t)
        prior_mean, prior_prec = sample_normal_wishart(rng, n, m, scatter, self.priors)
        bias_prec = sample_precision(rng, n, float(sq_t[0]), self.priors)
        if block.rows.numel() == 0:
            return 0.0
        d = self.d
        return sample_side(own_f, own_b, fetched[:, :d], fetched[:, d], centered, block.side,
                           alpha=self.alpha, prior_mean=torch.from_numpy(prior_mean),
                           prior_prec=torch.from_numpy(prior_prec), bias_prec=bias_prec,
                           generator=gen, budget=block.budget, mean_f=mean_f, mean_b=mean_b,
                           overrelax=self.cfg.train.gibbs.overrelax, with_targets=True)

    def _export(self) -> None:
        """The block tables := the posterior mean at width d (the draw before any sample)."""
        if self.samples == 0:
            src = (self.P, self.bu, self.Q, self.bi)
        else:
            p, q = self.mean.factors(self.d)
            src = (p, (self.sum_bu / self.samples).float(), q, (self.sum_bi / self.samples).float())
        for dst, s in zip((self.user_factors, self.user_bias, self.item_factors, self.item_bias), src):
            dst.copy_(s)

    def epoch_info(self) -> dict[str, float]:
        info = super().epoch_info()
        if self.chain_started:
            info.update(noise_sigma=round(float(self.alpha) ** -0.5, 6), samples=self.samples)
        return info

    # -- state: the chain's blocks travel with the model's (re-blocked on load) --------------
    def local_state(self) -> dict[str, torch.Tensor]:
        st = super().local_state()
        if self.chain_started:
            m = self.mean
            st.update({
                "user_chain_draw": self.P.clone(), "user_chain_draw_bias": self.bu.clone(),
                "user_chain_sum_bias": self.sum_bu.clone(), "user_chain_mean_u": m.u.clone(),
                "item_chain_draw": self.Q.clone(), "item_chain_draw_bias": self.bi.clone(),
                "item_chain_sum_bias": self.sum_bi.clone(), "item_chain_mean_v": m.v.clone(),
                "chain_alpha": torch.tensor(float(self.alpha), dtype=torch.float64),
                "chain_mean_s": m.s.clone(), "chain_mean_count": torch.tensor(m.count),
                "chain_mean_rank": torch.tensor(m.rank), "chain_samples": torch.tensor(self.samples)})
        return st

    def load_blocks(self, state: dict[str, torch.Tensor]) -> None:
        super().load_blocks(state)
        if "chain_alpha" not in state:
            return
        if not self.chain_started:
            self._start(warm=False)
        dev = self.P.device
        for attr, key in (("P", "user_chain_draw"), ("bu", "user_chain_draw_bias"),
                          ("sum_bu", "user_chain_sum_bias"), ("Q", "item_chain_draw"),
                          ("bi", "item_chain_draw_bias"), ("sum_bi", "item_chain_sum_bias")):
            setattr(self, attr, state[key].to(dev).clone())
        self.mean.load({"u": state["user_chain_mean_u"], "v": state["item_chain_mean_v"],
                        "s": state["chain_mean_s"], "count": state["chain_mean_count"],
                        "rank": state["chain_mean_rank"]})
        self.alpha = float(state["chain_alpha"])
        self.samples = int(state["chain_samples"])
