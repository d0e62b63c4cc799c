"""Row-sparse optimizer steps without autograd (``kernels.row_optim``): SparseAdam's lazy
Adam, and Adagrad (torch's dense Adagrad without decay, moving the batch's rows only).

A step adds the batch's loss gradient (× ``1 / denom``) to each side's sums and marks its
rows, all-reduces the user side's sums and marks densely at W > 1, then moves the marked
rows. The optimizer state lives in a torch optimizer (``RowSparseAdam`` /
``torch.optim.Adagrad``), shared with the row sides, so checkpoints do not depend on which
path trained.
"""

from __future__ import annotations

import torch

from svdfill.config import Config
from svdfill.distributed.world import World
from svdfill.kernels.dispatch import TrainingOps
from svdfill.kernels.model import PARAMS
from svdfill.kernels.row_optim import RowSide, model_sides
from svdfill.kernels.sgd import RowSparseAdam
from svdfill.train.minibatch import MinibatchSolver
from svdfill.train.shard import TrainShard

OPTIMIZERS = ("sparse_adam", "adagrad")
"""The ``train.optimizer`` values this solver runs."""


class RowSparseSolver(MinibatchSolver):
    """``ops.accumulate`` then ``ops.apply`` per step (torch or fused, chosen by the factory)."""

    def __init__(self, cfg: Config, world: World, shard: TrainShard, optimizer: str,
                 ops: TrainingOps):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"RowSparseSolver: no optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        self.adam = optimizer == "sparse_adam"
        # lazy Adam moves only the batch's rows: its weight decay joins the L2 weights
        # (Adagrad's fused step requires weight_decay = 0: config.validate)
        super().__init__(cfg, world, shard, decay_in_reg=self.adam)
        self.name = optimizer
        self.ops = ops
        t = cfg.train
        params = [getattr(self.model, n) for n in PARAMS]
        self.opt = (RowSparseAdam(params, lr=t.lr) if self.adam
                    else torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay))
        self.sides: tuple[RowSide, RowSide] | None = None

    def load_optimizer_tables(self, tables, lo: int, hi: int) -> None:
        super().load_optimizer_tables(tables, lo, hi)
        self.sides = None  # they hold the state tensors just replaced

    def step(self, users, items, ratings, *, lr: float, mu: float, denom: float) -> None:
        m, o = self.model, self.opt
        if self.sides is None:  # built late: loading a checkpoint replaces the state tensors
            self.sides = model_sides(m, o)
        users_side, items_side = self.sides
        group = o.param_groups[0]
        self.ops.accumulate(users_side, items_side, mu, users, items, ratings,
                            reg_factors=self.reg_f, reg_bias=self.reg_b, scale=1.0 / denom)
        if self.world.world_size > 1:
            # replicated user rows: the sums (and marks) of all ranks' batches, densely
            for t in (users_side.factors_grad, users_side.bias_grad, users_side.touched):
                self.world.all_reduce_sum(t)
        if self.adam:
            step = o.advance()
            hp = {"betas": group["betas"], "eps": group["eps"]}
        else:
            for p in (m.user_factors, m.item_factors, m.user_bias, m.item_bias):
                o.state[p]["step"] += 1  # torch.optim.Adagrad's per-parameter tensor count
            step = int(o.state[m.user_factors]["step"])
            hp = {"lr_decay": group["lr_decay"], "eps": group["eps"]}
        for side in self.sides:
            self.ops.apply(side, lr=group["lr"], step=step, **hp)
