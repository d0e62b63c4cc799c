"""Torch optimizers over autograd (``solver = "sgd"`` with ``adam``, ``adagrad``, and
``sparse_adam`` where DDP carries the sparse user gradients).

Forward and backward run through ``world.wrap(model)``: the identity for one process, DDP
over the replicated user table at W > 1 (item rows are local to the shard and hidden from
DDP). ``sparse_adam`` here builds the model with sparse gradients, so on gloo DDP
all-reduces only the touched user rows; :class:`svdfill.kernels.sgd.RowSparseAdam` applies
them.
"""

from __future__ import annotations

import torch

from svdfill.config import Config
from svdfill.distributed.world import World
from svdfill.kernels.model import PARAMS
from svdfill.kernels.sgd import RowSparseAdam
from svdfill.train.minibatch import MinibatchSolver
from svdfill.train.shard import TrainShard

OPTIMIZERS = ("adam", "adagrad", "sparse_adam")
"""The ``train.optimizer`` values this solver runs."""


class AutogradSolver(MinibatchSolver):
    """``loss = ½(Σ e² + L2 penalty of the batch's rows) / denom``, backward, optimizer step."""

    small_steps_one_thread = False  # the optimizer's dense step over every row wants threads

    def __init__(self, cfg: Config, world: World, shard: TrainShard, optimizer: str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"AutogradSolver: no optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        sparse = optimizer == "sparse_adam"
        # sparse_adam moves only the batch's rows: its weight decay joins the L2 weights
        super().__init__(cfg, world, shard, sparse=sparse, decay_in_reg=sparse)
        self.name = optimizer
        t = cfg.train
        params = [getattr(self.model, n) for n in PARAMS]
        if optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        elif optimizer == "adagrad":
            self.opt = torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)
        else:
            self.opt = RowSparseAdam(params, lr=t.lr)
        self.wrapped = world.wrap(self.model)

    def step(self, users, items, ratings, *, lr: float, mu: float, denom: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        pred, penalty = self.wrapped(users, items, reg=(self.reg_f, self.reg_b))
        e = ratings - pred
        loss = 0.5 * ((e * e).sum() + penalty) / denom
        loss.backward()
        self.opt.step()
