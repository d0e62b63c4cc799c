"""Funk SGD (``solver = "sgd"``, ``optimizer = "sgd"``): the Surprise update without autograd.

One process updates the tables in place (:func:`svdfill.kernels.sgd.sgd_step` or its fused
twin). At W > 1 the replicated user rows are not written by the step: each rank's user
deltas are summed with ``world.all_reduce_sum`` and added everywhere, which makes a step of
W ranks the single-process step over the union of their chunks
(:func:`svdfill.kernels.sgd.sgd_step_split`).
"""

from __future__ import annotations

import torch

from svdfill.config import Config
from svdfill.distributed.world import World
from svdfill.kernels.dispatch import TrainingOps
from svdfill.train.minibatch import MinibatchSolver
from svdfill.train.shard import TrainShard


class FunkSGD(MinibatchSolver):
    """Plain SGD steps on the rows of each batch; weight decay joins the L2 weights."""

    name = "sgd"

    def __init__(self, cfg: Config, world: World, shard: TrainShard, ops: TrainingOps):
        super().__init__(cfg, world, shard, decay_in_reg=True)
        self.ops = ops
        self._user_delta: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_epoch(self, lr: float) -> None:
        if self.world.world_size > 1:
            m = self.model
            self._user_delta = (torch.zeros_like(m.user_factors), torch.zeros_like(m.user_bias))

    def step(self, users, items, ratings, *, lr: float, mu: float, denom: float) -> None:
        m = self.model
        tables = (m.user_factors.data, m.item_factors.data, m.user_bias.data, m.item_bias.data)
        if self.world.world_size == 1:
            self.ops.step(*tables, mu, users, items, ratings, lr=lr,
                          reg_factors=self.reg_f, reg_bias=self.reg_b)
            return
        dP, db = self._user_delta
        dP.zero_()
        db.zero_()
        self.ops.step_split(*tables, mu, users, items, ratings, lr=lr, reg_factors=self.reg_f,
                            reg_bias=self.reg_b, user_factors_delta=dP, user_bias_delta=db)
        self.world.all_reduce_sum(dP)
        self.world.all_reduce_sum(db)
        m.user_factors.data += dP
        m.user_bias.data += db
