"""The contract every training method meets, and what they all share.

A solver owns the model (a :class:`~svdfill.kernels.model.BiasedMF` holding this rank's item
shard) and whatever else its method keeps between epochs (optimizer tables, a Gibbs chain).
The epoch loop (:mod:`svdfill.train.loop`) only calls the methods below, so a new method is
a new subclass and one line in :func:`svdfill.train.factory.make_solver`.
"""

from __future__ import annotations

from typing import Any

import torch

from svdfill.checkpoint import TrainingState
from svdfill.config import Config
from svdfill.distributed.world import World
from svdfill.kernels.metrics import error_sums, metrics_from_sums
from svdfill.kernels.model import ITEM_PARAMS, PARAMS, BiasedMF
from svdfill.train.shard import DeviceRatings, TrainShard, slice_state


class Solver:
    """One training method on one rank.

    Subclasses implement :meth:`run_epoch` and set ``self.opt`` when they keep a
    ``torch.optim.Optimizer`` (its state is then checkpointed by parameter name). Gradient
    methods whose step touches only the batch's rows pass ``decay_in_reg=True``: their
    weight decay joins the per-rating L2 weights.
    """

    name = "solver"
    """The method's name in logs (``train.solver``, or ``train.optimizer`` for ``sgd``)."""

    def __init__(self, cfg: Config, world: World, shard: TrainShard, *, sparse: bool = False,
                 decay_in_reg: bool = False):
        t = cfg.train
        self.cfg, self.world, self.shard = cfg, world, shard
        self.data = shard.ratings
        self.n_global = shard.n_global
        dev = world.device
        self.model = BiasedMF(shard.n_users, shard.n_items_local, cfg.model.factors,
                              init_std=cfg.model.init_std, global_mean=shard.global_mean,
                              seed=t.seed, item_offset=shard.lo, sparse=sparse).to(dev)
        with torch.no_grad():
            # rows nobody trains stay exactly zero: their predictions fall back to μ + bias
            self.model.user_factors[shard.user_counts.to(dev) == 0] = 0.0
            self.model.item_factors[shard.item_counts.to(dev) == 0] = 0.0
        self.reg_f = t.reg_factors
        self.reg_b = t.reg_bias
        if decay_in_reg:
            self.reg_f += t.weight_decay
            self.reg_b += t.weight_decay
        self.opt: torch.optim.Optimizer | None = None

    # -- training ---------------------------------------------------------------------------
    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch`` (``lr · lr_decay^(epoch − 1)``)."""
        return self.cfg.train.lr * self.cfg.train.lr_decay ** (epoch - 1)

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        """One pass over this rank's ratings; collective at W > 1 (every rank calls it)."""
        raise NotImplementedError

    def epoch_info(self) -> dict[str, float]:
        """Method-specific figures for the epoch's metrics row (none by default)."""
        return {}

    @torch.no_grad()
    def evaluate(self, d: DeviceRatings | None) -> dict[str, float]:
        """``{"mse", "rmse", "mae"}`` of the model on ``d`` summed over every rank (float);
        ``None`` contributes nothing. Collective at W > 1."""
        dev = self.world.device
        if d is None:
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
        else:
            sums = torch.zeros(3, dtype=torch.float64, device=d.ratings.device)
            chunk = 1 << 22
            for s in range(0, len(d), chunk):
                pred = self.model.predict(d.users[s:s + chunk], d.items[s:s + chunk])
                sums += error_sums(pred, d.ratings[s:s + chunk])
        self.world.all_reduce_sum(sums)
        return metrics_from_sums(sums)

    # -- state for checkpoints --------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """A copy of the model's five tensors (this rank's item shard, on the device)."""
        return {k: v.clone() for k, v in self.model.state_tensors().items()}

    def optimizer_tables(self) -> dict[str, dict[str, Any]]:
        """Optimizer state keyed by parameter name (not by position): world-size free."""
        if self.opt is None:
            return {}
        out = {}
        for name in PARAMS:
            st = self.opt.state.get(getattr(self.model, name), {})
            out[name] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                         for k, v in st.items()}
        return out

    def solver_state(self) -> dict[str, torch.Tensor] | None:
        """What a resumed run needs beyond the model and the optimizer, with full item
        tables on the main rank (``None`` elsewhere at W > 1, and for methods without
        any). Every rank must call it."""
        return None

    def load_state(self, state: TrainingState) -> None:
        """Continue from a checkpoint: its full tables sliced to this rank's shard."""
        lo, hi = self.shard.lo, self.shard.hi
        self.model.load_state_tensors(slice_state(state.model, lo, hi, self.world.device))
        self.load_optimizer_tables(state.optimizer, lo, hi)
        self.load_solver_state(state.solver)

    def load_optimizer_tables(self, tables: dict[str, dict[str, Any]], lo: int, hi: int) -> None:
        if self.opt is None or not tables:
            return
        dev = self.world.device
        for name in PARAMS:
            p = getattr(self.model, name)
            st = {}
            for k, v in tables.get(name, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    if name in ITEM_PARAMS:
                        v = v[lo:hi]
                    v = v.to(dev).clone()
                st[k] = v
            if st:
                self.opt.state[p] = st

    def load_solver_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore what :meth:`solver_state` returned (full item tables); nothing by default."""
