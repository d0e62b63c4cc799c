"""SGD on the grid layout (``solver = "sgd"``, ``optimizer = "sgd"`` or ``"adagrad"``,
``[dist] layout = "grid"``): stratified DSGD (:mod:`svdfill.distributed.dsgd`).

Rank r holds user block r and item block r of the layout (never a full table); item blocks
visit every rank once per epoch around a :class:`~svdfill.distributed.ring.Ring`. The class
meets the grid loop's solver calls (:func:`svdfill.train.grid_loop.fit_grid`, as
:class:`~svdfill.train.grid_als.GridALSSolver` does: ``run_epoch``, ``evaluate("train" |
"train_sample" | "val")``, ``epoch_info``, ``local_state``, ``load_blocks``, ``lr_at``,
``d``, ``n_val``, ``n_global``, ``global_mean``): its state is this rank's block tables,
exactly what a grid checkpoint file holds. Each evaluation is one more round of the ring
(the item blocks' model tables visit the rank's ratings); ``bytes`` counts sweeps and
evaluations.

Optimizers:

- ``sgd`` (Funk SGD): four block tables. At W = 1 it is
  :class:`~svdfill.train.funk_sgd.FunkSGD` bit for bit (same init, same shuffle, same steps).
- ``adagrad``: row-sparse Adagrad (:func:`svdfill.distributed.dsgd.dsgd_adagrad_epoch`, the
  ``training_ops("adagrad", ...)`` steps of ``train.kernel``, torch or fused). Each rank
  also holds the Adagrad sums of its user block (they stay) and of the item block it holds
  (they travel around the ring with the block: an epoch sends ``2·I·(d + 1)·4`` bytes per
  rank instead of ``I·(d + 1)·4``). No rank holds or all-reduces a full table of state. At
  W = 1 it is :class:`~svdfill.train.row_sparse.RowSparseSolver` bit for bit (the one-process
  solver of ``kernel = "fused"``; ``kernel = "torch"`` runs autograd + ``torch.optim.Adagrad``
  there, the same update up to the order of float sums). Needs ``train.weight_decay = 0``
  (torch's Adagrad decays every row every step; a row-sparse step moves the batch's rows
  only), as the fused one-process path does.
- ``adam`` / ``sparse_adam`` are refused: Adam's bias correction reads one global step count
  per parameter, and in DSGD every block (r, j) takes its own number of steps, on a rank
  that holds the item block for one sub-epoch only — there is no step count that the
  blocks' updates share, so the one-process update does not decompose into the blocks'
  (Adagrad has no bias correction: its per-row sums decompose exactly).

The Adagrad sums are block rows of the checkpoint (``user_factors_sum``, ``user_bias_sum``,
``item_factors_sum``, ``item_bias_sum``, :meth:`DSGDSolver.local_state`), so a grid
checkpoint re-blocks them with the model at another W. Resumed at epoch e it reshuffles as
an uninterrupted run (the seeds depend on (seed, phase, epoch, block) alone), at any W (the
grid loop re-blocks the tables); at the same W it continues exactly.
"""

from __future__ import annotations

import math

import torch

from svdfill.config import Config
from svdfill.distributed.dsgd import (ADAGRAD_ITEM_KEYS, ADAGRAD_USER_KEYS, ITEM_KEYS, Block,
                                      bucket_by_item_block, dsgd_adagrad_epoch, dsgd_epoch,
                                      ring_error_sums)
from svdfill.distributed.ring import Ring
from svdfill.distributed.world import World
from svdfill.errors import UserError
from svdfill.kernels.dispatch import TrainingOps
from svdfill.kernels.metrics import metrics_from_sums
from svdfill.kernels.threads import small_step_threads
from svdfill.kernels.model import init_rows

_USER_TABLE, _ITEM_TABLE = 1, 2  # kernels.model's init tables: the same rows as BiasedMF's

OPTIMIZERS = ("sgd", "adagrad")
"""The ``train.optimizer`` values DSGD runs (see the module docstring for why not Adam)."""


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
        if t.solver != "sgd" or t.optimizer not in OPTIMIZERS:
            why = ""
            # Adam / SparseAdam: bias correction reads a per-table step count, but DSGD's
            # blocks take different numbers of steps and an item block's state would need
            # one count per block (module docstring): no exact decomposition, so refused
            if t.optimizer in ("adam", "sparse_adam"):
                why = (" (Adam's bias correction needs one step count per table, and DSGD's "
                       "blocks each take their own number of steps)")
            raise UserError(f"the grid layout trains solver = \"sgd\" with optimizer = \"sgd\" "
                            f"or \"adagrad\" (DSGD), or solvers als and gibbs; not solver = "
                            f"{t.solver!r}, optimizer = {t.optimizer!r}{why}; use one of "
                            f"those or [dist] layout = \"items\"")
        if t.optimizer == "adagrad" and t.weight_decay > 0:
            raise UserError("the grid layout's Adagrad (DSGD) needs train.weight_decay = 0: "
                            "torch's Adagrad decays every row every step, a DSGD step moves "
                            "its block's rows only (reg_factors / reg_bias regularize per "
                            "rating)")
        if shard.size != world.world_size or shard.rank != world.rank:
            raise ValueError(f"grid shard of rank {shard.rank}/{shard.size} on world rank "
                             f"{world.rank}/{world.world_size}")
        if ops is None:
            from svdfill.kernels.dispatch import training_ops

            ops = training_ops(t.optimizer, world.device, t.kernel)
        self.adagrad = t.optimizer == "adagrad"
        if self.adagrad:
            self.name = "adagrad"
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
        if self.adagrad:  # per-row Adagrad sums, zero as torch.optim.Adagrad's start
            self.user_sums = {k: torch.zeros_like(v) for k, v in
                              zip(ADAGRAD_USER_KEYS, (self.user_factors, self.user_bias))}
            self.items.update({k: torch.zeros_like(self.items[m]) for k, m in
                               zip(ADAGRAD_ITEM_KEYS, ITEM_KEYS)})
        self._user_side = None  # the Adagrad RowSide of the user block, built when first used
        # Funk SGD: weight decay joins the L2 weights (as FunkSGD's); Adagrad: it is 0
        self.reg_f = t.reg_factors + t.weight_decay
        self.reg_b = t.reg_bias + t.weight_decay
        self.bytes = {"sweep_sent": 0, "sweep_received": 0, "eval_sent": 0, "eval_received": 0}
        self._last_sweep = (0, 0)

    def _sample(self, triple, world):
        """The per-epoch train-metrics sample of ``train.metrics_sample`` ratings (this
        rank's share, drawn once), as train.grid_als draws it."""
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
        # a ring receives every item block once, as it sends every one (to its other
        # neighbour): all that travels with a row — Q, b_i and, for Adagrad, their sums
        row = sum(math.prod(t.shape[1:]) * t.element_size() for t in self.items.values())
        recv = sum((hi - lo) * row for lo, hi in self.item_bounds) if self.ring.size > 1 else 0
        self.bytes["sweep_sent"] += sent
        self.bytes["sweep_received"] += recv
        self._last_sweep = (sent, recv)

    def _epoch(self, epoch: int, phase: str, bar):
        if self.adagrad:
            return dsgd_adagrad_epoch(
                self.user_side(), self.items, self.train_blocks, self.ring,
                accumulate=self.ops.accumulate, apply=self.ops.apply, global_mean=self.mu32,
                lr=self.lr_at(epoch), reg_factors=self.reg_f, reg_bias=self.reg_b,
                batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed, epoch=epoch,
                phase=phase, progress=bar.update if bar is not None else None)
        return dsgd_epoch(
            self.user_factors, self.user_bias, self.items, self.train_blocks, self.ring,
            step=self.ops.step, global_mean=self.mu32, lr=self.lr_at(epoch),
            reg_factors=self.reg_f, reg_bias=self.reg_b, batch_size=self.cfg.train.batch_size,
            seed=self.cfg.train.seed, epoch=epoch, phase=phase,
            progress=bar.update if bar is not None else None)

    def user_side(self):
        """The user block with its Adagrad sums as a
        :class:`~svdfill.kernels.row_optim.RowSide` (built once; again after
        :meth:`load_blocks` replaced the tensors)."""
        if self._user_side is None:
            from svdfill.kernels.row_optim import RowSide

            fs, bs = self.user_sums["user_factors_sum"], self.user_sums["user_bias_sum"]
            self._user_side = RowSide.of(self.user_factors, self.user_bias, fs, fs, bs, bs)
        return self._user_side

    def epoch_info(self) -> dict[str, float]:
        """Payload bytes the last epoch's ring sent (item blocks, with their Adagrad sums):
        the largest of any rank and the world's total (collective)."""
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
        # only the model tables travel: the Adagrad sums stay home during an evaluation
        sums = ring_error_sums(self.user_factors, self.user_bias,
                               {k: self.items[k] for k in ITEM_KEYS}, blocks, self.ring,
                               global_mean=self.mu32)
        self.bytes["eval_sent"] += self.ring.bytes_sent - s0
        self.bytes["eval_received"] += self.ring.bytes_sent - s0
        self.world.all_reduce_sum(sums)
        return metrics_from_sums(sums)

    # -- state ------------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """Copies of this rank's block tables: ``user_factors`` [U_r, d], ``user_bias``
        [U_r] (rows ``[u_lo, u_hi)``), ``item_factors`` [I_r, d], ``item_bias`` [I_r] (rows
        ``[i_lo, i_hi)``), and with Adagrad their sums ``user_factors_sum``,
        ``user_bias_sum``, ``item_factors_sum``, ``item_bias_sum`` (same shapes): what
        ``grid_checkpoint.save_grid_model`` writes (``user_*`` / ``item_*`` block rows,
        re-blocked on load)."""
        st = {"user_factors": self.user_factors.clone(), "user_bias": self.user_bias.clone(),
              **{k: self.items[k].clone() for k in ITEM_KEYS}}
        if self.adagrad:
            st.update({k: v.clone() for k, v in self.user_sums.items()})
            st.update({k: self.items[k].clone() for k in ADAGRAD_ITEM_KEYS})
        return st

    def load_blocks(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's block tables from ``state`` (as :meth:`local_state` returns, or
        ``grid_checkpoint.load_grid_block``); shapes must match. With Adagrad the state
        must hold the sums too (ValueError otherwise: a checkpoint of ``optimizer = "sgd"``
        cannot continue as Adagrad)."""
        dev = self.world.device
        cur = {"user_factors": self.user_factors, "user_bias": self.user_bias, **self.items}
        if self.adagrad:
            cur.update(self.user_sums)
            missing = [k for k in cur if k not in state]
            if missing:
                raise ValueError(f"grid state has no {', '.join(missing)}: not the state of a "
                                 f"DSGD Adagrad run (optimizer = \"sgd\"?)")
        for k, t in cur.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise ValueError(f"grid state {k}: {tuple(state[k].shape)}, block is {tuple(t.shape)}")
        take = lambda k: state[k].to(dev, torch.float32).clone()  # noqa: E731
        self.user_factors = take("user_factors")
        self.user_bias = take("user_bias")
        self.items = {k: take(k) for k in self.items}
        if self.adagrad:
            self.user_sums = {k: take(k) for k in ADAGRAD_USER_KEYS}
        self._user_side = None  # it held the tensors just replaced

    def tensor_bytes(self) -> int:
        """Bytes of the block tables this rank holds, Adagrad sums included (the visiting
        item block is the same size as its own on average; the largest block bounds it)."""
        user = [self.user_factors, self.user_bias]
        if self.adagrad:
            user += list(self.user_sums.values())
        return 4 * sum(t.numel() for t in user + list(self.items.values()))

    def optimizer_tables(self) -> dict:
        """Nothing by parameter name: Funk SGD keeps no optimizer state, and DSGD's Adagrad
        sums are block rows of :meth:`local_state` (no rank holds a full table)."""
        return {}

    def solver_state(self) -> None:
        """Nothing beyond the blocks."""
        return None
