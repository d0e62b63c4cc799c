"""Funk SGD on the grid layout (``solver = "sgd"``, ``optimizer = "sgd"``, ``[dist] layout =
"grid"``): stratified DSGD (:mod:`svdfill.distributed.dsgd`).

Rank r holds user block r and item block r of the layout (never a full table); item blocks
visit every rank once per epoch around a :class:`~svdfill.distributed.ring.Ring`. The class
meets the grid loop's solver calls (:func:`svdfill.train.grid_loop.fit_grid`, as
:class:`~svdfill.train.grid_als.GridALSSolver` does: ``run_epoch``, ``evaluate("train" |
"train_sample" | "val")``, ``epoch_info``, ``local_state``, ``load_blocks``, ``lr_at``,
``d``, ``n_val``, ``n_global``, ``global_mean``): its state is this rank's four block
tables, exactly what a grid checkpoint file holds. Each evaluation is one more round of the
ring (the item blocks visit the rank's ratings); ``bytes`` counts sweeps and evaluations.

At W = 1 it is :class:`~svdfill.train.funk_sgd.FunkSGD` bit for bit (same init, same
shuffle, same steps). Resumed at epoch e it reshuffles as an uninterrupted run (the seeds
depend on (seed, phase, epoch, block) alone), at any W (the grid loop re-blocks the tables).
"""

from __future__ import annotations

import torch

from svdfill.config import Config
from svdfill.distributed.dsgd import (ITEM_KEYS, Block, bucket_by_item_block, dsgd_epoch,
                                      ring_error_sums)
from svdfill.distributed.ring import Ring
from svdfill.distributed.world import World
from svdfill.errors import UserError
from svdfill.kernels.dispatch import TrainingOps
from svdfill.kernels.metrics import metrics_from_sums
from svdfill.kernels.threads import small_step_threads
from svdfill.kernels.model import init_rows

_USER_TABLE, _ITEM_TABLE = 1, 2  # kernels.model's init tables: the same rows as BiasedMF's


class DSGDSolver:
    """DSGD on rank ``shard.rank`` of a grid (``shard``: a ``distributed.grid.GridShard`` or
    anything with ``rank``, ``size``, ``layout.user_bounds`` / ``item_bounds`` / ``n_users`` /
    ``n_items``, ``by_user`` and optionally ``val_by_user`` / ``by_item``: triples
    ``(users int64, items int64, ratings float32)`` of GLOBAL ids).

    Building it is collective (μ and the item counts are summed over ranks).
    """

    name = "sgd"

    def __init__(self, cfg: Config, world: World, shard, ops: TrainingOps | None = None,
                 ring: Ring | None = None):
        t = cfg.train
        if t.solver != "sgd" or t.optimizer != "sgd":
            raise UserError(f"the grid layout trains solver = \"sgd\" with optimizer = \"sgd\" "
                            f"(DSGD) or ALS; not solver = {t.solver!r}, optimizer = "
                            f"{t.optimizer!r}")
        if shard.size != world.world_size or shard.rank != world.rank:
            raise ValueError(f"grid shard of rank {shard.rank}/{shard.size} on world rank "
                             f"{world.rank}/{world.world_size}")
        if ops is None:
            from svdfill.kernels.dispatch import training_ops

            ops = training_ops("sgd", world.device, t.kernel)
        self.cfg, self.world, self.shard, self.ops = cfg, world, shard, ops
        self.ring = ring if ring is not None else Ring(world)
        dev = world.device
        layout = shard.layout
        self.d = cfg.model.factors
        self.user_bounds = [tuple(map(int, b)) for b in layout.user_bounds]
        self.item_bounds = [tuple(map(int, b)) for b in layout.item_bounds]
        self.u_lo, self.u_hi = self.user_bounds[shard.rank]
        self.i_lo, self.i_hi = self.item_bounds[shard.rank]
        users, items, ratings = shard.by_user
        self.train_blocks = self.blocks_of(shard.by_user)
        self.sample_blocks = self.blocks_of(self._sample(shard.by_user, world))
        val = getattr(shard, "val_by_user", None)
        n_val = 0 if val is None else len(val[0])
        self.val_blocks = self.blocks_of(val) if n_val else None
        s = torch.tensor([float(ratings.double().sum()), float(len(ratings)), float(n_val)],
                         dtype=torch.float64)
        world.all_reduce_sum(s)
        self.n_global = float(s[1])
        self.n_val = int(s[2])
        self.global_mean = float(s[0] / s[1]) if s[1] > 0 else 0.0
        # the one-process model stores μ as float32 and its steps read that value
        self.mu32 = float(torch.tensor(self.global_mean, dtype=torch.float32))

        d, std = cfg.model.factors, cfg.model.init_std
        P = init_rows(self.u_lo, self.u_hi, d, std=std, seed=t.seed, table=_USER_TABLE)
        Q = init_rows(self.i_lo, self.i_hi, d, std=std, seed=t.seed, table=_ITEM_TABLE)
        # rows nobody trains stay exactly zero (as in Solver): predictions fall back to μ + bias
        uc = torch.bincount(users.to(torch.int64).cpu() - self.u_lo,
                            minlength=self.u_hi - self.u_lo)
        P[uc == 0] = 0.0
        Q[self._item_counts().cpu() == 0] = 0.0
        self.user_factors = P.to(dev)
        self.user_bias = torch.zeros(self.u_hi - self.u_lo, dtype=torch.float32, device=dev)
        self.items = {"item_factors": Q.to(dev),
                      "item_bias": torch.zeros(self.i_hi - self.i_lo, dtype=torch.float32,
                                               device=dev)}
        self.reg_f = t.reg_factors + t.weight_decay
        self.reg_b = t.reg_bias + t.weight_decay
        self.bytes = {"sweep_sent": 0, "sweep_received": 0, "eval_sent": 0, "eval_received": 0}
        self._last_sweep = (0, 0)

    def _sample(self, triple, world):
        """The per-epoch train-metrics sample of ``train.metrics_sample`` ratings (this
        rank's share, drawn once), as train.grid_als draws it."""
        import math

        ms = self.cfg.train.metrics_sample
        n = len(triple[2])
        total = world.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64))
        if ms <= 0 or float(total[0]) <= ms:
            return triple
        m = math.ceil(ms * n / max(float(total[0]), 1.0))
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + world.rank)
        idx = torch.randint(0, n, (m,), generator=g).sort().values
        return tuple(x[idx.to(x.device)] for x in triple)

    def _item_counts(self) -> torch.Tensor:
        """Ratings per item of this rank's item block (int64 [I_r]), over every rank."""
        n = self.i_hi - self.i_lo
        by_item = getattr(self.shard, "by_item", None)
        if by_item is not None:
            return torch.bincount(by_item[1].to(torch.int64).cpu() - self.i_lo, minlength=n)
        # without the item-side routing: each rank counts its blocks, summed block by block
        out = None
        for j, (lo, hi) in enumerate(self.item_bounds):
            c = torch.bincount(self.train_blocks[j][1].cpu(), minlength=hi - lo).double()
            self.world.all_reduce_sum(c)
            if j == self.shard.rank:
                out = c.long()
        return out

    def blocks_of(self, triple) -> list[Block]:
        """GLOBAL-id ratings of this rank's users cut by item block, on the device."""
        users, items, ratings = triple
        dev = self.world.device
        return [tuple(x.to(dev) for x in b) for b in
                bucket_by_item_block(users, items, ratings, self.item_bounds, self.u_lo)]

    # -- training ---------------------------------------------------------------------------
    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch`` (``lr · lr_decay^(epoch − 1)``)."""
        return self.cfg.train.lr * self.cfg.train.lr_decay ** (epoch - 1)

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        """W sub-epochs over this rank's ratings; collective (every rank calls it)."""
        s0 = self.ring.bytes_sent
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"{phase} epoch {epoch}", leave=False, unit="step",
                       dynamic_ncols=True)
        with small_step_threads(self.user_factors.device, self.cfg.train.batch_size):
            self.items = self._epoch(epoch, phase, bar)
        if bar is not None:
            bar.close()
        sent = self.ring.bytes_sent - s0
        # a ring receives exactly as many blocks as it sends, but from its other neighbour
        recv = sum((hi - lo) * (self.d + 1) * 4 for lo, hi in self.item_bounds) if self.ring.size > 1 else 0
        self.bytes["sweep_sent"] += sent
        self.bytes["sweep_received"] += recv
        self._last_sweep = (sent, recv)

    def _epoch(self, epoch: int, phase: str, bar):
        return dsgd_epoch(
            self.user_factors, self.user_bias, self.items, self.train_blocks, self.ring,
            step=self.ops.step, global_mean=self.mu32, lr=self.lr_at(epoch),
            reg_factors=self.reg_f, reg_bias=self.reg_b, batch_size=self.cfg.train.batch_size,
            seed=self.cfg.train.seed, epoch=epoch, phase=phase,
            progress=bar.update if bar is not None else None)

    def epoch_info(self) -> dict[str, float]:
        """Payload bytes the last epoch's ring sent (item blocks): the largest of any rank
        and the world's total (collective)."""
        sent = self._last_sweep[0]
        tot = torch.tensor([float(sent)], dtype=torch.float64)
        self.world.all_reduce_sum(tot)
        return {"sweep_bytes_sent_max": self.world.all_reduce_max_int(sent),
                "sweep_bytes_sent_total": int(tot[0])}

    @torch.no_grad()
    def evaluate(self, data="val") -> dict[str, float]:
        """``{"mse", "rmse", "mae"}`` over every rank. ``data``: ``"train"``,
        ``"train_sample"`` (the ``train.metrics_sample`` share), ``"val"``, a GLOBAL-id
        triple of this rank's users' ratings, a list of blocks (:meth:`blocks_of`), or
        ``None`` (contributes nothing). Collective: the item blocks make one round of the
        ring."""
        if isinstance(data, str):
            blocks = {"train": self.train_blocks, "train_sample": self.sample_blocks,
                      "val": self.val_blocks}[data]
        elif isinstance(data, tuple):
            blocks = self.blocks_of(data)
        else:
            blocks = data
        if blocks is None:
            blocks = self.blocks_of(tuple(torch.zeros(0, dtype=dt) for dt in
                                          (torch.int64, torch.int64, torch.float32)))
        s0 = self.ring.bytes_sent
        sums = ring_error_sums(self.user_factors, self.user_bias, self.items, blocks,
                               self.ring, global_mean=self.mu32)
        self.bytes["eval_sent"] += self.ring.bytes_sent - s0
        self.bytes["eval_received"] += self.ring.bytes_sent - s0
        self.world.all_reduce_sum(sums)
        return metrics_from_sums(sums)

    # -- state ------------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """Copies of this rank's four block tables: ``user_factors`` [U_r, d], ``user_bias``
        [U_r] (rows ``[u_lo, u_hi)``), ``item_factors`` [I_r, d], ``item_bias`` [I_r] (rows
        ``[i_lo, i_hi)``): what ``grid_checkpoint.save_grid_model`` writes."""
        return {"user_factors": self.user_factors.clone(), "user_bias": self.user_bias.clone(),
                **{k: self.items[k].clone() for k in ITEM_KEYS}}

    def load_blocks(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's four block tables from ``state`` (as :meth:`local_state`
        returns, or ``grid_checkpoint.load_grid_block``); shapes must match."""
        dev = self.world.device
        cur = {"user_factors": self.user_factors, "user_bias": self.user_bias, **self.items}
        for k, t in cur.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise ValueError(f"grid state {k}: {tuple(state[k].shape)}, block is {tuple(t.shape)}")
        self.user_factors = state["user_factors"].to(dev, torch.float32).clone()
        self.user_bias = state["user_bias"].to(dev, torch.float32).clone()
        self.items = {k: state[k].to(dev, torch.float32).clone() for k in ITEM_KEYS}

    def tensor_bytes(self) -> int:
        """Bytes of the block tables this rank holds (the visiting item block is the same
        size as its own on average; the largest block bounds it)."""
        return 4 * (self.user_factors.numel() + self.user_bias.numel()
                    + sum(t.numel() for t in self.items.values()))

    def optimizer_tables(self) -> dict:
        """Funk SGD keeps no optimizer state."""
        return {}

    def solver_state(self) -> None:
        """Nothing beyond the blocks."""
        return None
