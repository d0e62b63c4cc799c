"""The epoch loop of biased-MF training, shared by `svdfill train`, torchrun and Ray Train.

One code path for one process and many: everything that differs between them goes
through the :class:`~svdfill.distributed.world.World` hooks, which are the identity for the
default single-process ``World()``:

- the item tables hold only this rank's shard ``[lo, hi)`` and the loop sees only the
  ratings of those items, with item ids made local (``items − lo``);
- every rank takes ``world.all_reduce_max_int(ceil(n_local / batch))`` steps per epoch,
  slicing its own permutation into that many near-equal chunks, so collectives pair up;
- autograd optimizers run forward/backward through ``world.wrap(model)`` (DDP over the
  replicated user table); the no-autograd Funk ``sgd`` step sums its user-row deltas with
  ``world.all_reduce_sum`` (W > 1) — see :func:`svdfill.kernels.sgd.sgd_step_split`; the
  row-sparse optimizer steps without autograd (``kernels.row_optim``: SparseAdam, and
  Adagrad with ``kernel = "fused"``) all-reduce the user side's gradient sums the same way;
- ALS solves its item shard locally and all-reduces the users' normal equations block by
  block (``kernels.als.als_sweep(user_sum=...)``), so every rank solves the same user
  systems; the Gibbs sampler does the same for its user draws (one seed for all ranks) and
  pools the moments behind its hyperparameters (``kernels.gibbs.GibbsChain(shard_sum=...)``);
- metric sums are all-reduced, so every rank sees the same validation RMSE and takes the
  same early-stopping decision;
- checkpoints hold full tables (``world.gather_items``) written by the main rank only, so a
  run resumes at another world size (item rows are sliced back to the new shard).

Ratings live on the device as tensors; an epoch is one device-side permutation (its
generator seeded from ``(seed, phase, epoch, rank)``, which makes the shuffle of every
epoch reproducible on resume without carrying generator state) and slices of it: no
DataLoader, no Python per rating.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from svdfill import checkpoint as ck
from svdfill.config import Config, to_dict
from svdfill.data.dataset import Ratings
from svdfill.distributed.world import World
from svdfill.kernels.metrics import error_sums, metrics_from_sums
from svdfill.kernels.model import BiasedMF
from svdfill.kernels.sgd import RowSparseAdam, sgd_step, sgd_step_split
from svdfill.kernels.row_optim import (
    RowSide,
    accumulate_gradients,
    apply_adagrad,
    apply_adam,
    model_sides,
)
from svdfill.launch.errors import UserError

USER_PARAMS = ("user_factors", "user_bias")
ITEM_PARAMS = ("item_factors", "item_bias")
PARAMS = ("user_factors", "item_factors", "user_bias", "item_bias")
_FUSED_WARNED = False


# -- small helpers --------------------------------------------------------------------------

def _phase_seed(seed: int, phase: str, epoch: int, rank: int) -> int:
    tag = 1 if phase == "select" else 2
    return (int(seed) * 1_000_003 + tag * 7_919_009 + epoch * 104_729 + rank * 15_485_863) % (2**63 - 1)


def _fmt_row(row: dict) -> str:
    def part(prefix: str, label: str) -> str:
        if row.get(f"{prefix}_mse") is None or (isinstance(row.get(f"{prefix}_mse"), float)
                                                 and math.isnan(row[f"{prefix}_mse"])):
            return ""
        return (f"  {label} MSE {row[f'{prefix}_mse']:.4f} RMSE {row[f'{prefix}_rmse']:.4f} "
                f"MAE {row[f'{prefix}_mae']:.4f}")
    head = ("refit epoch" if row["phase"] == "refit" else "epoch") + f" {row['epoch']}"
    chain = (f"  σ {row['noise_sigma']:.3f}, {row['samples']} averaged" if "samples" in row else "")
    return f"{head}{part('train', 'train')}{part('val', 'val')}{chain}  ({row['seconds']:.1f} s)"


def localize(r: Ratings, lo: int, hi: int) -> Ratings:
    """The ratings of items ``[lo, hi)`` with item ids made local (``items − lo``); the item
    id space becomes ``hi − lo``. The identity (no copy) for the whole catalogue."""
    if lo == 0 and hi == r.n_items:
        return r
    keep = (r.items >= lo) & (r.items < hi)
    sub = r.subset(keep)
    return Ratings(sub.users, sub.items - lo, sub.ratings, r.n_users, hi - lo)


def _fused_ok(device: torch.device, fallback: str) -> bool:
    """True when the fused Triton kernels compile on ``device``; else False after one
    warning naming the torch ``fallback`` used instead."""
    global _FUSED_WARNED
    if device.type != "cuda":
        why = f"device is {device}"
    else:
        from svdfill.kernels.triton_util import triton_mode, unavailable_reason

        # the kernel modules import without triton and then silently run torch: ask explicitly
        if triton_mode(device) == "compiled":
            return True
        why = unavailable_reason(device) or "triton cannot compile here"
    if not _FUSED_WARNED:
        warnings.warn(f"train.kernel = 'fused' needs CUDA and triton ({why}); using {fallback}",
                      RuntimeWarning, stacklevel=3)
        _FUSED_WARNED = True
    return False


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="step", dynamic_ncols=True)


# -- the loop -------------------------------------------------------------------------------

@dataclass
class _Data:
    """Local ratings on the device: users/items int64 [n] (items shard-local), ratings f32."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor

    @classmethod
    def of(cls, r: Ratings, device: torch.device) -> "_Data":
        return cls(r.users.to(device, torch.int64), r.items.to(device, torch.int64),
                   r.ratings.to(device, torch.float32))

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    def sample(self, m: int, seed: int) -> "_Data":
        """``m`` ratings drawn uniformly with replacement by a generator seeded with ``seed``,
        in storage order (gathers stay local); ``self`` when ``m`` is 0 or not below ``len``."""
        n = len(self)
        if m <= 0 or m >= n:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (m,), generator=g).sort().values.to(self.ratings.device)
        return _Data(self.users[idx], self.items[idx], self.ratings[idx])


@dataclass
class FitResult:
    """What :func:`fit` returns on every rank.

    state: the final model's five tensors with full item tables (main rank; ``None``
    elsewhere), on CPU. summary: the run's summary dict (same on every rank). history: one
    dict per epoch (the lines of ``metrics.jsonl``).
    """

    state: dict[str, torch.Tensor] | None
    summary: dict
    history: list[dict] = field(default_factory=list)


class _Trainer:
    """One training phase (selection with early stopping, or the refit)."""

    def __init__(self, cfg: Config, world: World, train: _Data, n_users: int, n_items_local: int,
                 n_items: int, lo: int, global_mean: float, user_counts: torch.Tensor,
                 item_counts: torch.Tensor):
        t = cfg.train
        self.cfg, self.world, self.data = cfg, world, train
        self.n_items, self.lo = n_items, lo
        dev = world.device
        self.solver = t.solver
        self.kind = t.optimizer if t.solver == "sgd" else t.solver
        # row-sparse steps without autograd (kernels.row_optim; fused kernels on CUDA with
        # kernel = "fused"). SparseAdam: same math as autograd + RowSparseAdam and ~2× faster
        # on CPU, so always, except at W > 1 on gloo with kernel = "torch", where DDP
        # all-reduces only the touched user rows (sparse); elsewhere the user sums travel
        # densely. Adagrad: with kernel = "fused" (lazy = torch's dense Adagrad, no decay).
        self.direct = (self.kind == "sparse_adam" and (
            t.kernel == "fused" or world.world_size == 1
            or not getattr(world, "sparse_users", True))) or (
            self.kind == "adagrad" and t.kernel == "fused")
        self.sides: tuple[RowSide, RowSide] | None = None
        if self.direct:  # the step's two phases, chosen once
            adam = self.kind == "sparse_adam"
            self.row_accumulate, self.row_apply = (
                accumulate_gradients, apply_adam if adam else apply_adagrad)
            if t.kernel == "fused" and _fused_ok(torch.device(dev),
                                                 f"the torch {self.kind} row step"):
                from svdfill.kernels import triton_row_optim as k

                self.row_accumulate = k.fused_accumulate_gradients
                self.row_apply = k.fused_apply_adam if adam else k.fused_apply_adagrad
        self.model = BiasedMF(n_users, n_items_local, cfg.model.factors, init_std=cfg.model.init_std,
                              global_mean=global_mean, seed=t.seed, item_offset=lo,
                              sparse=self.kind == "sparse_adam" and not self.direct).to(dev)
        with torch.no_grad():
            # rows nobody trains stay exactly zero: their predictions fall back to μ + bias
            self.model.user_factors[user_counts.to(dev) == 0] = 0.0
            self.model.item_factors[item_counts.to(dev) == 0] = 0.0
        self.reg_f = t.reg_factors
        self.reg_b = t.reg_bias
        if self.kind in ("sgd", "sparse_adam"):
            # these paths touch only the rows of the batch: weight decay joins the L2 weight
            self.reg_f += t.weight_decay
            self.reg_b += t.weight_decay
        self.opt: torch.optim.Optimizer | None = None
        params = [getattr(self.model, n) for n in PARAMS]
        if self.kind == "adam":
            self.opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        elif self.kind == "adagrad":
            self.opt = torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)
        elif self.kind == "sparse_adam":
            self.opt = RowSparseAdam(params, lr=t.lr)
        self.wrapped = (world.wrap(self.model) if self.opt is not None and not self.direct
                        else None)
        self.sgd_fn, self.sgd_split_fn = sgd_step, sgd_step_split
        if self.kind == "sgd" and t.kernel == "fused" \
                and _fused_ok(torch.device(dev), "the torch sgd step"):
            from svdfill.kernels.triton_sgd import fused_sgd_step, fused_sgd_step_split

            self.sgd_fn, self.sgd_split_fn = fused_sgd_step, fused_sgd_step_split
        # ALS and Gibbs at W > 1: the users' normal equations are summed over the item shards
        self.user_counts = user_counts
        self.chain = None  # the Gibbs sampler, started by the first sweep or a checkpoint
        n_global = world.all_reduce_sum(torch.tensor([float(len(train))], dtype=torch.float64))
        self.n_global = float(n_global[0])

    # -- one epoch ---------------------------------------------------------------------------
    def lr_at(self, epoch: int) -> float:
        return self.cfg.train.lr * self.cfg.train.lr_decay ** (epoch - 1)

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        lr = self.lr_at(epoch)
        d = self.data
        if self.kind == "als":
            self._als_sweep()
            return
        if self.kind == "gibbs":
            if self.chain is None:
                self._start_chain()
            t = self.cfg.train
            # one seed for every rank: the users' draws and the hyperparameters must agree
            # (the chain gives each rank its own stream for its items)
            self.chain.sweep(d.users, d.items, d.ratings, accumulate=epoch > t.burn_in,
                             seed=_phase_seed(t.seed, phase, epoch, 0))
            self.model.load_state_tensors(self.chain.mean_state(self.cfg.model.factors))
            return
        dev = d.ratings.device
        n = len(d)
        batch = self.cfg.train.batch_size
        steps = self.world.all_reduce_max_int(max(1, math.ceil(n / batch)))
        g = torch.Generator(device=dev)
        g.manual_seed(_phase_seed(self.cfg.train.seed, phase, epoch, self.world.rank))
        perm = torch.randperm(n, generator=g, device=dev)
        bounds = [(k * n) // steps for k in range(steps + 1)]
        # the loss is a sum over the global step's ratings scaled by this constant, so a
        # step of W ranks is one single-process step over the union of their chunks
        denom = max(self.n_global / steps, 1.0)
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        bar = _progress(steps, f"{phase} epoch {epoch}", progress)
        m = self.model
        mu = float(m.global_mean)  # once per epoch: on CUDA each float() is a sync
        if self.kind == "sgd" and self.world.world_size > 1:
            dP = torch.zeros_like(m.user_factors)
            db = torch.zeros_like(m.user_bias)
        for s in range(steps):
            idx = perm[bounds[s]:bounds[s + 1]]
            u, i, r = d.users[idx], d.items[idx], d.ratings[idx]
            if self.kind == "sgd":
                if self.world.world_size == 1:
                    self.sgd_fn(m.user_factors.data, m.item_factors.data, m.user_bias.data,
                                m.item_bias.data, mu, u, i, r, lr=lr,
                                reg_factors=self.reg_f, reg_bias=self.reg_b)
                else:
                    dP.zero_()
                    db.zero_()
                    self.sgd_split_fn(m.user_factors.data, m.item_factors.data,
                                      m.user_bias.data, m.item_bias.data, mu, u, i, r, lr=lr,
                                      reg_factors=self.reg_f, reg_bias=self.reg_b,
                                      user_factors_delta=dP, user_bias_delta=db)
                    self.world.all_reduce_sum(dP)
                    self.world.all_reduce_sum(db)
                    m.user_factors.data += dP
                    m.user_bias.data += db
            elif self.direct:
                self._row_step(u, i, r, mu, 1.0 / denom)
            else:
                self.opt.zero_grad(set_to_none=True)
                pred, penalty = self.wrapped(u, i, reg=(self.reg_f, self.reg_b))
                e = r - pred
                loss = 0.5 * ((e * e).sum() + penalty) / denom
                loss.backward()
                self.opt.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _als_sweep(self) -> None:
        from svdfill.kernels.als import als_sweep

        d = self.data
        sharded = self.world.world_size > 1
        als_sweep(self.model, d.users, d.items, d.ratings, reg_factors=self.reg_f,
                  reg_bias=self.reg_b, reg_exponent=self.cfg.train.als_reg_exponent,
                  bias_reg_exponent=self.cfg.train.als_bias_reg_exponent,
                  user_sum=self.world.all_reduce_sum if sharded else None,
                  user_counts=self.user_counts if sharded else None)

    def _start_chain(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """The Gibbs chain from ``gibbs_warm_start`` ALS sweeps (a MAP fit: the chain then
        needs little burn-in) with α from their residuals, or from a checkpointed ``state``."""
        from svdfill.kernels.gibbs import GibbsChain, GibbsPriors

        t = self.cfg.train
        alpha = t.gibbs_noise_precision or 2.0
        if state is None and t.gibbs_warm_start > 0:
            for _ in range(t.gibbs_warm_start):
                self._als_sweep()
            mse = self.evaluate(self.data)["mse"]
            if not t.gibbs_noise_precision and mse > 0:
                alpha = 1.0 / mse
        priors = GibbsPriors(beta0=t.gibbs_beta0, w0=t.gibbs_w0, noise_precision=t.gibbs_noise_precision)
        shard = {}
        if self.world.world_size > 1:
            shard = {"shard_sum": self.world.all_reduce_sum, "user_counts": self.user_counts,
                     "n_items_total": self.n_items, "rank": self.world.rank}
        self.chain = GibbsChain(self.model.state_tensors(), alpha=alpha, priors=priors,
                                mean_rank=t.gibbs_mean_rank or 2 * self.cfg.model.factors,
                                overrelax=t.gibbs_overrelax, **shard)
        if state is not None:
            self.chain.load_state(state)

    def epoch_info(self) -> dict[str, float]:
        """Solver-specific figures for the epoch's metrics row."""
        if self.chain is None:
            return {}
        return {"noise_sigma": round(self.chain.noise_sigma, 6), "samples": self.chain.samples}

    def solver_state(self) -> dict[str, torch.Tensor] | None:
        """What a resumed run needs beyond the model and the optimizer (the Gibbs chain),
        with full item tables on the main rank (``None`` elsewhere at W > 1); every rank
        must call it."""
        if self.chain is None:
            return None
        from svdfill.kernels.gibbs import ITEM_STATE_KEYS

        state = {k: v.detach() for k, v in self.chain.state().items()}
        if self.world.world_size > 1:
            # zero-width tables (no sample averaged yet) have nothing to send
            items = {k: state[k] for k in ITEM_STATE_KEYS if state[k].numel()}
            full = self.world.gather_items(items, self.n_items)
            if full is None:
                return None
            for k in ITEM_STATE_KEYS:
                state[k] = full[k] if k in full else state[k].new_zeros(self.n_items, *state[k].shape[1:])
        return {k: v.cpu() for k, v in state.items()}

    def load_solver_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None and self.kind == "gibbs":
            from svdfill.kernels.gibbs import ITEM_STATE_KEYS

            hi = self.lo + self.model.item_factors.shape[0]
            self._start_chain(_slice_state(state, self.lo, hi, self.world.device, ITEM_STATE_KEYS))

    def _row_step(self, u, i, r, mu: float, scale: float) -> None:
        """One row-sparse optimizer step (kernels.row_optim: SparseAdam's or Adagrad's math)
        on the autograd loss × ``scale``, without autograd; the optimizer state lives in
        ``self.opt`` (checkpoints do not depend on the path)."""
        m, o = self.model, self.opt
        adam = self.kind == "sparse_adam"
        if self.sides is None:  # built late: loading a checkpoint replaces the state tensors
            self.sides = model_sides(m, o)
        users_side, items_side = self.sides
        group = o.param_groups[0]
        self.row_accumulate(users_side, items_side, mu, u, i, r, reg_factors=self.reg_f,
                            reg_bias=self.reg_b, scale=scale)
        if self.world.world_size > 1:
            # replicated user rows: the sums (and marks) of all ranks' batches, densely
            for t in (users_side.factors_grad, users_side.bias_grad, users_side.touched):
                self.world.all_reduce_sum(t)
        if adam:
            step = o.advance()
            hp = {"betas": group["betas"], "eps": group["eps"]}
        else:
            for p in (m.user_factors, m.item_factors, m.user_bias, m.item_bias):
                o.state[p]["step"] += 1  # torch.optim.Adagrad's per-parameter tensor count
            step = int(o.state[m.user_factors]["step"])
            hp = {"lr_decay": group["lr_decay"], "eps": group["eps"]}
        for side in self.sides:
            self.row_apply(side, lr=group["lr"], step=step, **hp)

    # -- metrics -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, d: _Data | None) -> dict[str, float]:
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

    # -- state for checkpoints -----------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
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

    def load_optimizer_tables(self, tables: dict[str, dict[str, Any]], lo: int, hi: int) -> None:
        if self.opt is None or not tables:
            return
        self.sides = None
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


def _gather_full(world: World, local: dict[str, torch.Tensor], n_items: int,
                 opt_tables: dict[str, dict[str, Any]] | None = None):
    """Full-catalogue copies of a local model state (and optimizer tables) on the main rank
    (``None`` elsewhere); every rank must call it."""
    item_tables = {k: local[k] for k in ITEM_PARAMS}
    opt_keys = []
    for pname, st in (opt_tables or {}).items():
        if pname in ITEM_PARAMS:
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    key = f"opt.{pname}.{k}"
                    item_tables[key] = v
                    opt_keys.append((pname, k, key))
    full = world.gather_items(item_tables, n_items)
    if full is None:
        return None, None
    state = {k: v.detach().cpu() for k, v in local.items()}
    for k in ITEM_PARAMS:
        state[k] = full[k].detach().cpu()
    opt = None
    if opt_tables is not None:
        opt = {p: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
               for p, st in opt_tables.items()}
        for pname, k, key in opt_keys:
            opt[pname][k] = full[key].detach().cpu()
    return state, opt


def _slice_state(state: dict[str, torch.Tensor], lo: int, hi: int, device,
                 item_keys=ITEM_PARAMS) -> dict[str, torch.Tensor]:
    """``state`` on ``device`` with the rows ``[lo, hi)`` of its ``item_keys`` tables."""
    return {k: (v[lo:hi] if k in item_keys else v).to(device) for k, v in state.items()}


def _counts(world: World, r: Ratings, n_users: int, n_items_local: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Global rating count per user (all-reduced) and local count per shard item."""
    uc = torch.bincount(r.users.to(dev, torch.int64), minlength=n_users).to(torch.float64)
    world.all_reduce_sum(uc)
    ic = torch.bincount(r.items.to(dev, torch.int64), minlength=n_items_local)
    return uc, ic


def _global_mean(world: World, r: Ratings, dev) -> float:
    s = torch.tensor([float(r.ratings.to(torch.float64).sum()), float(len(r))],
                     dtype=torch.float64, device=dev)
    world.all_reduce_sum(s)
    return float(s[0] / s[1]) if s[1] > 0 else 0.0


def _run_phase(phase: str, cfg: Config, world: World, train: Ratings, val: Ratings | None,
               epochs: int, *, n_items: int, lo: int, hi: int, run_dir: Path | None,
               ckpt: dict | None, carry: dict, history: list[dict], quiet: bool,
               log: Callable[[str], None]) -> dict:
    """Train one phase; returns ``{"state" (local), "best_epoch", "best", "epochs_run",
    "stopped_early", "seconds"}``. ``carry`` is phase-independent checkpoint content (the
    selection result during a refit, config, id map)."""
    dev = world.device
    t = cfg.train
    n_local_items = hi - lo
    data = _Data.of(train, dev)
    vdata = _Data.of(val, dev) if val is not None and _n_global(world, val) > 0 else None
    mu = _global_mean(world, train, dev)
    uc, ic = _counts(world, train, train.n_users, n_local_items, dev)
    tr = _Trainer(cfg, world, data, train.n_users, n_local_items, n_items, lo, mu, uc, ic)
    # each rank's share of the per-epoch train-metrics sample follows its share of the ratings
    n_all = max(tr.n_global, 1.0)
    share = math.ceil(t.metrics_sample * len(data) / n_all) if t.metrics_sample > 0 else 0
    tdata = data.sample(share, _phase_seed(t.seed, phase, 0, world.rank))

    start_epoch, best, bad, seconds = 0, None, 0, 0.0
    if ckpt is not None and ckpt.get("phase") == phase:
        tr.model.load_state_tensors(_slice_state(ckpt["model"], lo, hi, dev))
        tr.load_optimizer_tables(ckpt.get("optimizer") or {}, lo, hi)
        tr.load_solver_state(ckpt.get("solver"))
        start_epoch = int(ckpt["epoch"])
        bad = int(ckpt["bad_epochs"])
        seconds = float(ckpt["seconds"])
        if ckpt.get("best") is not None:
            b = ckpt["best"]
            best = {"epoch": b["epoch"], "metrics": b["metrics"],
                    "state": _slice_state(b["state"], lo, hi, dev)}
        del history[:]
        history.extend(ckpt["history"])

    progress = (not quiet) and world.is_main and sys.stderr.isatty()
    stopped_early = False
    epoch = start_epoch
    if best is not None and t.patience and bad >= t.patience and vdata is not None:
        stopped_early = True
    while epoch < epochs and not stopped_early:
        epoch += 1
        t0 = time.perf_counter()
        tr.run_epoch(phase, epoch, progress)
        tm = tr.evaluate(tdata)
        vm = tr.evaluate(vdata) if vdata is not None else {"mse": math.nan, "rmse": math.nan, "mae": math.nan}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        seconds += dt
        row = {"phase": phase, "epoch": epoch, "lr": tr.lr_at(epoch),
               **{f"train_{k}": v for k, v in tm.items()}, **{f"val_{k}": v for k, v in vm.items()},
               **tr.epoch_info(), "seconds": round(dt, 4)}
        history.append(row)
        if not quiet and world.is_main:
            log(_fmt_row(row))
        if run_dir is not None and world.is_main:
            # rewritten whole (atomically) each epoch: after a resume it never holds the
            # epochs that were rolled back to the checkpoint
            ck.save_jsonl(run_dir / ck.METRICS_FILE, history)
        if vdata is None:
            best = {"epoch": epoch, "metrics": vm, "state": None}
        elif best is None or vm["rmse"] < best["metrics"]["rmse"] - t.min_delta:
            best = {"epoch": epoch, "metrics": vm, "state": tr.local_state()}
            bad = 0
        else:
            bad += 1
            if t.patience and bad >= t.patience:
                stopped_early = True
        ckpt_dir = None
        if run_dir is not None and (epoch % t.checkpoint_every == 0 or epoch == epochs or stopped_early):
            _write_checkpoint(world, run_dir, phase, epoch, tr, best, bad, seconds, history,
                              carry, n_items)
            ckpt_dir = run_dir if world.is_main else None
        world.report_epoch(dict(row), ckpt_dir)

    if vdata is not None and best is not None and best["state"] is not None:
        tr.model.load_state_tensors(best["state"])
    return {"state": tr.local_state(), "best_epoch": best["epoch"] if best else epoch,
            "best": best["metrics"] if best else None, "epochs_run": epoch,
            "stopped_early": stopped_early, "seconds": seconds, "global_mean": mu,
            "train_metrics": tr.evaluate(data)}


def _n_global(world: World, r: Ratings) -> int:
    t = torch.tensor([float(len(r))], dtype=torch.float64)
    world.all_reduce_sum(t)
    return int(t[0])


def _write_checkpoint(world: World, run_dir: Path, phase: str, epoch: int, tr: _Trainer,
                      best: dict | None, bad: int, seconds: float, history: list[dict],
                      carry: dict, n_items: int) -> None:
    state, opt = _gather_full(world, tr.local_state(), n_items, tr.optimizer_tables())
    best_out = None
    if best is not None:
        bstate = None
        if best["state"] is not None:
            bstate, _ = _gather_full(world, best["state"], n_items)
        best_out = {"epoch": best["epoch"], "metrics": best["metrics"], "state": bstate}
    solver = tr.solver_state()  # a collective at W > 1: before the other ranks return
    if not world.is_main:
        return
    if best_out is not None and best_out["state"] is None and best["state"] is not None:
        best_out = None  # pragma: no cover - gather returned nothing on the main rank
    obj = {"phase": phase, "epoch": epoch, "model": state, "optimizer": opt, "solver": solver,
           "best": best_out, "bad_epochs": bad, "seconds": seconds,
           "history": [dict(r) for r in history],
           "rng": {"scheme": "per-epoch generator seeded by (seed, phase, epoch, rank)",
                   "seed": tr.cfg.train.seed, "next_epoch": epoch + 1},
           "world_size": world.world_size, **carry}
    ck.save_training_state(run_dir, obj)
    ck.save_jsonl(run_dir / ck.METRICS_FILE, history)


def fit(cfg: Config, train: Ratings, val: Ratings | None, world: World | None = None,
        run_dir: str | os.PathLike | None = None, *, resume: bool = False, quiet: bool = False,
        log: Callable[[str], None] = print, extra_checkpoint: dict | None = None) -> FitResult:
    """Train biased MF on ``train``, early-stopping on ``val``; optionally refit.

    train, val: :class:`~svdfill.data.dataset.Ratings` over the full id space (``n_items`` =
    the whole catalogue). Only the ratings of this rank's item shard are used (all of them
    for ``World()``), so a rank may be given everything or just its shard. ``val`` may be
    ``None`` or empty (no early stopping; the last epoch is kept).
    world: where this process stands; ``None`` = ``World(device=cfg.train.device)``.
    run_dir: where ``checkpoint.pt`` (every ``train.checkpoint_every`` epochs) and
    ``metrics.jsonl`` go (main rank); ``None`` = keep nothing on disk.
    resume: continue from ``run_dir/checkpoint.pt`` when there is one; the result then
    equals an uninterrupted run's (CPU; same config and world size).
    extra_checkpoint: more plain entries stored in every checkpoint (e.g. the id map).

    Selection phase: up to ``train.epochs`` epochs, early stopping after ``train.patience``
    epochs without a validation RMSE better by ``train.min_delta``; the best epoch's
    weights are restored. With ``train.refit`` (and a non-empty ``val``) a second phase
    trains from scratch on train+val for the best epoch count; its weights are the result.
    """
    world = world or World(device=torch.device(cfg.train.device))
    run_dir = Path(run_dir) if run_dir is not None else None
    n_items = train.n_items
    lo, hi = world.item_range(n_items)
    tr_loc = localize(train, lo, hi)
    va_loc = localize(val, lo, hi) if val is not None else None
    ckpt = None
    if resume and run_dir is not None:
        ckpt = world.broadcast_object(ck.load_training_state(run_dir) if world.is_main else None)
    carry = {"config": to_dict(cfg), **(extra_checkpoint or {})}
    history: list[dict] = []
    n_val = _n_global(world, va_loc) if va_loc is not None else 0

    if ckpt is not None and ckpt.get("phase") == "refit":
        select = ckpt["select"]
    else:
        sel = _run_phase("select", cfg, world, tr_loc, va_loc, cfg.train.epochs, n_items=n_items,
                         lo=lo, hi=hi, run_dir=run_dir, ckpt=ckpt, carry=carry, history=history,
                         quiet=quiet, log=log)
        select = {"best_epoch": sel["best_epoch"], "epochs_run": sel["epochs_run"],
                  "stopped_early": sel["stopped_early"], "seconds": sel["seconds"],
                  "val": sel["best"], "train": sel["train_metrics"], "global_mean": sel["global_mean"]}
        final = sel

    refit = None
    if cfg.train.refit and n_val > 0:
        both = tr_loc.cat(va_loc)
        if ckpt is None or ckpt.get("phase") != "refit":
            ckpt = None  # the refit starts from scratch (its resume restores the history)
        carry = {**carry, "select": select}
        ref = _run_phase("refit", cfg, world, both, None, int(select["best_epoch"]), n_items=n_items,
                         lo=lo, hi=hi, run_dir=run_dir, ckpt=ckpt, carry=carry, history=history,
                         quiet=quiet, log=log)
        refit = {"epochs": ref["epochs_run"], "n_train": _n_global(world, both),
                 "seconds": ref["seconds"], "global_mean": ref["global_mean"],
                 **{f"train_{k}": v for k, v in ref["train_metrics"].items()}}
        final = ref

    state, _ = _gather_full(world, final["state"], n_items)
    val_m = select["val"] or {"mse": math.nan, "rmse": math.nan, "mae": math.nan}
    cold = _cold_counts(world, tr_loc, va_loc, train.n_users, hi - lo)
    summary = {
        "val_rmse": val_m["rmse"], "val_mae": val_m["mae"], "val_mse": val_m["mse"],
        "train_rmse": select["train"]["rmse"], "train_mae": select["train"]["mae"],
        "train_mse": select["train"]["mse"],
        "best_epoch": select["best_epoch"], "epochs_run": select["epochs_run"],
        "stopped_early": select["stopped_early"],
        "train_seconds": select["seconds"] + (refit["seconds"] if refit else 0.0),
        "n_train": _n_global(world, tr_loc), "n_val": n_val, **cold,
        "refit": refit,
        "global_mean": refit["global_mean"] if refit else select["global_mean"],
        "n_users": train.n_users, "n_items": n_items, "factors": cfg.model.factors,
        "solver": cfg.train.solver, "optimizer": cfg.train.optimizer if cfg.train.solver == "sgd" else None,
        "kernel": cfg.train.kernel, "device": str(world.device), "world_size": world.world_size,
        "torch_threads": torch.get_num_threads(),  # of rank 0: context for train_seconds
        "seed": cfg.train.seed, "split_seed": cfg.data.split_seed,
    }
    return FitResult(state=state, summary=summary, history=history)


def _cold_counts(world: World, train: Ratings, val: Ratings | None, n_users: int,
                 n_items_local: int) -> dict[str, int]:
    dev = world.device
    if val is None:
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
    else:
        uc, ic = _counts(world, train, n_users, n_items_local, dev)
        cu = uc[val.users.to(dev, torch.int64)] == 0
        ci = ic[val.items.to(dev, torch.int64)] == 0
        sums = torch.stack([(cu | ci).sum(), cu.sum(), ci.sum()]).to(torch.float64)
    world.all_reduce_sum(sums)
    a, b, c = (int(x) for x in sums.cpu())
    return {"n_val_cold": a, "n_val_cold_users": b, "n_val_cold_items": c}


# -- the whole job: data → fit → run directory --------------------------------------------

_IGNORED_FOR_IDENTITY = {("train", "epochs"), ("train", "device"), ("train", "checkpoint_every"),
                         ("name",)}
_IGNORED_SECTIONS = {"fill", "dist"}


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    """Dotted keys where two config dicts differ in what changes the trained model
    (ignores ``train.epochs``, ``train.device``, ``train.checkpoint_every``, ``name``,
    ``fill.*``, ``dist.*``; NaN equals NaN)."""
    fa, fb = _flat(a), _flat(b)
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        if key in _IGNORED_FOR_IDENTITY or key[0] in _IGNORED_SECTIONS:
            continue
        x, y = fa.get(key), fb.get(key)
        same = (x == y) or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if not same:
            diffs.append(".".join(key))
    return diffs


def prepare_run_dir(run_dir: str | os.PathLike, cfg: Config, *, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``run_dir`` before any work; creates nothing.

    Returns ``"fresh"`` (start a new run; with ``overwrite`` the old run's files were
    removed), ``"resume"`` (continue this run from its checkpoint) or ``"done"`` (this run
    already finished and ``resume`` was asked). Raises :class:`FileExistsError` when the
    folder holds a different run (or this one, without ``--resume``) and ``overwrite`` is off.
    """
    d = Path(run_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d}: exists and is not a directory")
    ours = [f for f in ck.RUN_FILES if (d / f).exists()]
    others = [p.name for p in d.iterdir() if p.name not in ck.RUN_FILES and not p.name.startswith(".")] \
        if d.is_dir() else []
    if overwrite:
        for f in ours:
            (d / f).unlink()
        for p in d.glob(".*.tmp") if d.is_dir() else []:
            p.unlink(missing_ok=True)
        return "fresh"
    if not ours:
        if others:
            raise FileExistsError(f"{d}: folder is not empty and holds no svdfill run "
                                  f"({', '.join(sorted(others)[:5])}…); pick another --out or pass --overwrite")
        return "fresh"
    old = None
    if (d / ck.CONFIG_FILE).exists():
        from svdfill.config import ConfigError, load_config
        try:
            old = to_dict(load_config(d / ck.CONFIG_FILE))
        except ConfigError:
            old = None
    diffs = config_differences(old, to_dict(cfg)) if old is not None else ["(unreadable config.toml)"]
    if diffs:
        raise FileExistsError(f"{d}: holds a different run (differs in {', '.join(diffs[:8])}); "
                              "pass --overwrite to replace it or pick another --out")
    if not resume:
        raise FileExistsError(f"{d}: already holds this run; pass --resume to continue it or "
                              "--overwrite to start again")
    if (d / ck.SUMMARY_FILE).exists() and (d / ck.MODEL_FILE).exists():
        return "done"
    return "resume" if (d / ck.CHECKPOINT_FILE).exists() else "fresh"


def run_training(cfg: Config, run_dir: str | os.PathLike, *, world: World | None = None,
                 reshard: Callable[[World, Ratings], World] | None = None,
                 resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 log: Callable[[str], None] = print, data: tuple[Ratings, Any] | None = None) -> dict:
    """Load ``cfg.data``, split it, :func:`fit`, and write the run directory; returns the
    summary dict.

    world: this process's World; ``None`` = one process on ``cfg.train.device``.
    reshard: ``reshard(world, train) -> World`` called after the split, e.g. to give every
    rank its item shard from the training ratings' per-item counts.
    data: ``(ratings, idmap)`` already loaded (skips reading ``cfg.data``).
    Writes (main rank): ``config.toml`` first, then checkpoints and ``metrics.jsonl`` while
    training, then ``seen.pt``, ``model.pt`` and last ``summary.json``. On failure the
    final outputs of this attempt are removed; the checkpoint stays for ``--resume``, and
    a run that never reached a checkpoint leaves nothing behind.
    """
    from svdfill.data.csr import build_csr, build_csr_pair
    from svdfill.data.dataset import load_dataset
    from svdfill.data.split import split

    run_dir = Path(run_dir)
    w0 = world if world is not None else World(device=torch.device(cfg.train.device))
    action = w0.broadcast_object(prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
                                 if w0.is_main else None)
    if action == "done":
        if w0.is_main and not quiet:
            log(f"{run_dir}: run already complete (summary.json); nothing to resume")
        import json
        return json.loads((run_dir / ck.SUMMARY_FILE).read_text())

    t_start = time.perf_counter()
    ratings, idmap = data if data is not None else load_dataset(cfg.data)
    if len(ratings) == 0:
        raise UserError(f"{cfg.data.path or 'synthetic data'}: no ratings to train on")
    train, val = split(ratings, how=cfg.data.split, fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    w = reshard(w0, train) if reshard is not None else w0

    created_dir = not run_dir.exists()
    wrote_final: list[Path] = []
    try:
        if w.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ck.save_config_echo(run_dir, cfg)
        w.barrier()
        if w.is_main and not quiet:
            log(f"training on {len(train):,} ratings ({ratings.n_users:,} users × {ratings.n_items:,} items), "
                f"validating on {len(val):,}; {cfg.train.solver if cfg.train.solver != 'sgd' else 'sgd/' + cfg.train.optimizer}, d={cfg.model.factors}, "
                f"device {w.device}" + (f", world {w.world_size}" if w.world_size > 1 else ""))
        t_fit = time.perf_counter()
        res = fit(cfg, train, val, w, run_dir, resume=action == "resume", quiet=quiet, log=log,
                  extra_checkpoint={"idmap": idmap.to_state()})
        t_write = time.perf_counter()
        if w.is_main:
            wrote_final.append(run_dir / ck.SEEN_FILE)
            if res.summary["refit"]:  # trained on train ∪ val = every rated pair: one CSR
                seen_all = build_csr(ratings.users, ratings.items, ratings.n_users, device=w.device)
                seen_train = seen_all
            else:  # train and train ∪ val from one sort (split partitions the ratings)
                seen_train, seen_all = build_csr_pair(train.users, train.items, val.users, val.items,
                                                      ratings.n_users, device=w.device)
            ck.save_seen(run_dir, seen_train, seen_all)
            wrote_final.append(run_dir / ck.MODEL_FILE)
            ck.save_model(run_dir, res.state, idmap, cfg, res.summary)
            ck.save_jsonl(run_dir / ck.METRICS_FILE, res.history)
            wrote_final.append(run_dir / ck.SUMMARY_FILE)
            ck.save_json(run_dir / ck.SUMMARY_FILE, res.summary)
            try:
                from svdfill.launch.plot import write_learning_curve

                write_learning_curve(run_dir)
            except ImportError:
                pass
            if not quiet:
                log(f"wall time: data {t_fit - t_start:.1f} s (load, split), training "
                    f"{t_write - t_fit:.1f} s, writing the run {time.perf_counter() - t_write:.1f} s")
        w.barrier()
    except BaseException:
        if w.is_main:
            for p in wrote_final:
                p.unlink(missing_ok=True)
            if not (run_dir / ck.CHECKPOINT_FILE).exists():
                for f in ck.RUN_FILES:
                    (run_dir / f).unlink(missing_ok=True)
                if created_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
                    shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return res.summary
