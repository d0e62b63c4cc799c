"""ALS on the grid layout (``[dist] layout = "grid"``, ``train.solver = "als"``).

Rank r holds P, b_u of its user block and Q, b_i of its item block (:mod:`svdfill.distributed.grid`).
One epoch is one sweep:

1. user half-sweep: fetch ``[q_i, b_i]`` of the items rated by the block's users (one
   all-to-all of exactly those rows, :class:`~svdfill.distributed.grid.RowExchange`), then
   solve every user of the block — its ratings are all in ``by_user``, so the normal
   equations and the penalties ``λ_f·n^α``, ``λ_b·n^β`` are the one-process ones;
2. item half-sweep: fetch ``[p_u, b_u]`` (new) of the users who rated the block's items,
   solve every item of the block.

The result equals the one-process sweep (:func:`svdfill.kernels.als.als_sweep`) up to the
order of float sums. Initialization draws each block's rows alone (:func:`init_rows`), which
equal the same rows of a one-process table. Evaluation fetches the validation items' rows
the same way and all-reduces the error sums.
"""

from __future__ import annotations

import math

import torch

from svdfill.config import Config
from svdfill.distributed.grid import GridShard, RowExchange, needed_ids
from svdfill.kernels.half_sweep import BlockSide, block_predict, solve_block, table
from svdfill.kernels.metrics import error_sums, metrics_from_sums
from svdfill.kernels.model import _ITEM_TABLE, _USER_TABLE, init_rows

GRID_TABLES = ("user_factors", "user_bias", "item_factors", "item_bias")
"""A rank's state: its user block's rows, then its item block's."""


class GridALSSolver:
    """One rank's share of grid ALS: the blocks, the row exchanges and the block plans.

    Built collectively (every rank at once) from its :class:`GridShard`. ``bytes`` counts
    what this rank sent to / received from other ranks, split into the sweeps
    (``"sweep_sent"``, ``"sweep_received"``) and evaluation (``"eval_sent"``, ``"eval_received"``).
    """

    name = "als"

    def __init__(self, cfg: Config, world, shard: GridShard):
        self.cfg, self.world, self.shard = cfg, world, shard
        dev = world.device
        d = cfg.model.factors
        t = cfg.train
        self.d = d
        lay = shard.layout
        self.u_lo, self.u_hi = shard.user_block
        self.i_lo, self.i_hi = shard.item_block
        nu, ni = self.u_hi - self.u_lo, self.i_hi - self.i_lo
        bu, bi, bv = shard.by_user, shard.by_item, shard.val_by_user
        s = torch.tensor([float(bu[2].to(torch.float64).sum()), float(bu[2].numel())],
                         dtype=torch.float64, device=dev)
        world.all_reduce_sum(s)
        self.n_global = float(s[1])
        self.global_mean = float(s[0] / s[1]) if s[1] > 0 else 0.0
        # the one-process model stores μ as float32: predictions and targets use that value
        self.mu32 = float(torch.tensor(self.global_mean, dtype=torch.float32))

        need, cols = needed_ids(bu[1])
        self.ex_items = RowExchange(world, need, lay.item_bounds)
        self.user_side = BlockSide.build(bu[0] - self.u_lo, cols, bu[2], nu, need.numel(), d, dev)
        need, cols = needed_ids(bi[0])
        self.ex_users = RowExchange(world, need, lay.user_bounds)
        self.item_side = BlockSide.build(bi[1] - self.i_lo, cols, bi[2], ni, need.numel(), d, dev)
        del need, cols
        v_need, v_cols = needed_ids(bv[1])
        self.ex_val = RowExchange(world, v_need, lay.item_bounds)
        self.val = (bv[0].to(dev) - self.u_lo, v_cols.to(dev), bv[2].to(dev))
        self.n_val = int(world.all_reduce_sum(torch.tensor([float(bv[2].numel())],
                                                           dtype=torch.float64))[0])

        self.user_factors = init_rows(self.u_lo, self.u_hi, d, std=cfg.model.init_std,
                                      seed=t.seed, table=_USER_TABLE).to(dev)
        self.item_factors = init_rows(self.i_lo, self.i_hi, d, std=cfg.model.init_std,
                                      seed=t.seed, table=_ITEM_TABLE).to(dev)
        self.user_bias = torch.zeros(nu, device=dev)
        self.item_bias = torch.zeros(ni, device=dev)
        # rows nobody trains stay exactly zero, as in the one-process model
        self.user_factors[self.user_side.counts == 0] = 0.0
        self.item_factors[self.item_side.counts == 0] = 0.0
        self.reg_f, self.reg_b = t.reg_factors, t.reg_bias
        self.bytes = {"sweep_sent": 0, "sweep_received": 0, "eval_sent": 0, "eval_received": 0}
        self._last_sweep = (0, 0)

    # -- training ---------------------------------------------------------------------------
    def lr_at(self, epoch: int) -> float:
        return self.cfg.train.lr * self.cfg.train.lr_decay ** (epoch - 1)

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        """One sweep (collective)."""
        a = self.cfg.train.als
        reg = dict(reg_factors=self.reg_f, reg_bias=self.reg_b, reg_exponent=a.reg_exponent,
                   bias_reg_exponent=a.bias_reg_exponent)
        s0 = self.ex_items.bytes_sent + self.ex_users.bytes_sent
        r0 = self.ex_items.bytes_received + self.ex_users.bytes_received
        items = self.ex_items.fetch(table(self.item_factors, self.item_bias))
        solve_block(self.user_factors, self.user_bias, items, self.user_side, self.mu32, **reg)
        del items
        users = self.ex_users.fetch(table(self.user_factors, self.user_bias))
        solve_block(self.item_factors, self.item_bias, users, self.item_side, self.mu32, **reg)
        sent = self.ex_items.bytes_sent + self.ex_users.bytes_sent - s0
        recv = self.ex_items.bytes_received + self.ex_users.bytes_received - r0
        self.bytes["sweep_sent"] += sent
        self.bytes["sweep_received"] += recv
        self._last_sweep = (sent, recv)

    def epoch_info(self) -> dict[str, float]:
        """Bytes the last sweep sent to other ranks: the largest of any rank and the world's
        total (collective)."""
        sent = self._last_sweep[0]
        tot = torch.tensor([float(sent)], dtype=torch.float64)
        self.world.all_reduce_sum(tot)
        return {"sweep_bytes_sent_max": self.world.all_reduce_max_int(sent),
                "sweep_bytes_sent_total": int(tot[0])}

    @torch.no_grad()
    def evaluate(self, which: str) -> dict[str, float]:
        """``{"mse","rmse","mae"}`` over the world of ``"val"`` (validation ratings) or
        ``"train"`` (every training rating), or ``"train_sample"`` (the per-epoch sample of
        ``train.metrics_sample``). Collective."""
        dev = self.world.device
        if which == "val":
            ex, (rows, cols, r) = self.ex_val, self.val
        else:
            ex = self.ex_items
            side = self.user_side
            rows, cols, r = side.rows, side.cols, side.ratings
            if which == "train_sample":
                rows, cols, r = self._sample(rows, cols, r)
        s0, r0 = ex.bytes_sent, ex.bytes_received
        fetched = ex.fetch(table(self.item_factors, self.item_bias))
        self.bytes["eval_sent"] += ex.bytes_sent - s0
        self.bytes["eval_received"] += ex.bytes_received - r0
        if which != "val":  # the train exchange's counters are the sweeps'
            ex.bytes_sent, ex.bytes_received = s0, r0
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
        if r.numel():
            pred = block_predict(self.user_factors, self.user_bias, rows, fetched, cols, self.mu32)
            sums += error_sums(pred, r)
        self.world.all_reduce_sum(sums)
        return metrics_from_sums(sums)

    def _sample(self, rows, cols, r):
        ms = self.cfg.train.metrics_sample
        n = r.numel()
        if ms <= 0 or self.n_global <= ms:
            return rows, cols, r
        m = math.ceil(ms * n / max(self.n_global, 1.0))
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + self.world.rank)
        idx = torch.randint(0, n, (m,), generator=g).sort().values.to(r.device)
        return rows[idx], cols[idx], r[idx]

    # -- state ------------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """Copies of this rank's four block tables."""
        return {k: getattr(self, k).clone() for k in GRID_TABLES}

    def load_blocks(self, state: dict[str, torch.Tensor]) -> None:
        """Copy this rank's four block tables in place (shapes must match)."""
        for k in GRID_TABLES:
            t = getattr(self, k)
            if state[k].shape != t.shape:
                raise ValueError(f"grid state {k}: {tuple(state[k].shape)}, block is {tuple(t.shape)}")
            t.copy_(state[k].to(t.device))

    def tensor_bytes(self) -> int:
        """Bytes of the block tables this rank holds."""
        return sum(getattr(self, k).numel() * 4 for k in GRID_TABLES)
