"""Bayesian MF by Gibbs sampling (``solver = "gibbs"``): one epoch is one sweep of the
chain; the model is the running posterior mean of the draws after ``[train.gibbs] burn_in``.

The chain starts from ``warm_start`` ALS sweeps (a MAP fit: little burn-in is needed then)
with the noise precision from their residuals, or from a checkpoint. At W > 1 every rank
draws with the same seed (the users' draws and the hyperparameters must agree; the chain
gives each rank its own stream for its items), the users' normal equations and the
hyperparameters' moments are summed over the ranks, and checkpoints hold the chain's full
item tables.
"""

from __future__ import annotations

import torch

from svdfill.train.als import als_sweep_shard
from svdfill.train.shard import phase_seed, slice_state
from svdfill.train.solver import Solver


class GibbsSolver(Solver):
    """The chain (:class:`svdfill.kernels.gibbs.GibbsChain`) is started by the first sweep
    or by :meth:`load_solver_state`."""

    name = "gibbs"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chain = None

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        if self.chain is None:
            self._start_chain()
        g, d = self.cfg.train.gibbs, self.data
        self.chain.sweep(d.users, d.items, d.ratings, accumulate=epoch > g.burn_in,
                         seed=phase_seed(self.cfg.train.seed, phase, epoch, 0))
        self.model.load_state_tensors(self.chain.mean_state(self.cfg.model.factors))

    def _start_chain(self, state: dict[str, torch.Tensor] | None = None) -> None:
        from svdfill.kernels.gibbs import GibbsChain, GibbsPriors

        g = self.cfg.train.gibbs
        alpha = g.noise_precision or 2.0
        if state is None and g.warm_start > 0:
            for _ in range(g.warm_start):
                als_sweep_shard(self)
            mse = self.evaluate(self.data)["mse"]
            if not g.noise_precision and mse > 0:
                alpha = 1.0 / mse
        priors = GibbsPriors(beta0=g.beta0, w0=g.w0, noise_precision=g.noise_precision)
        shard = {}
        if self.world.world_size > 1:
            shard = {"shard_sum": self.world.all_reduce_sum, "user_counts": self.shard.user_counts,
                     "n_items_total": self.shard.n_items, "rank": self.world.rank}
        self.chain = GibbsChain(self.model.state_tensors(), alpha=alpha, priors=priors,
                                mean_rank=g.mean_rank or 2 * self.cfg.model.factors,
                                overrelax=g.overrelax, **shard)
        if state is not None:
            self.chain.load_state(state)

    def epoch_info(self) -> dict[str, float]:
        if self.chain is None:
            return {}
        return {"noise_sigma": round(self.chain.noise_sigma, 6), "samples": self.chain.samples}

    def solver_state(self) -> dict[str, torch.Tensor] | None:
        """The chain's state with full item tables on the main rank (``None`` elsewhere at
        W > 1, and before the first sweep); every rank must call it."""
        if self.chain is None:
            return None
        from svdfill.kernels.gibbs import ITEM_STATE_KEYS

        state = {k: v.detach() for k, v in self.chain.state().items()}
        if self.world.world_size > 1:
            n_items = self.shard.n_items
            # zero-width tables (no sample averaged yet) have nothing to send
            items = {k: state[k] for k in ITEM_STATE_KEYS if state[k].numel()}
            full = self.world.gather_items(items, n_items)
            if full is None:
                return None
            for k in ITEM_STATE_KEYS:
                state[k] = full[k] if k in full else state[k].new_zeros(n_items, *state[k].shape[1:])
        return {k: v.cpu() for k, v in state.items()}

    def load_solver_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return
        from svdfill.kernels.gibbs import ITEM_STATE_KEYS

        self._start_chain(slice_state(state, self.shard.lo, self.shard.hi, self.world.device,
                                      ITEM_STATE_KEYS))
