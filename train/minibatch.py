"""The epoch of every gradient method: one seeded device-side permutation cut into steps.

Every rank takes ``world.all_reduce_max_int(ceil(n_local / batch))`` steps, slicing its own
permutation into that many near-equal chunks, so the collectives of a step pair up across
ranks. The loss of a step is a sum over the global step's ratings divided by
``denom = n_global / steps``, so a step of W ranks is one single-process step over the
union of their chunks. No DataLoader, no Python per rating.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from svdfill.kernels.threads import small_step_threads
from svdfill.train.shard import phase_seed
from svdfill.train.solver import Solver


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of ``total`` steps, or None when ``enabled`` is off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="step", dynamic_ncols=True)


class MinibatchSolver(Solver):
    """A gradient method: subclasses give :meth:`step` (and :meth:`begin_epoch`)."""

    small_steps_one_thread: bool = True
    """Steps touch only their batch's rows, so small ones run on one CPU thread
    (:func:`svdfill.kernels.threads.small_step_threads`); False where a step also runs a
    dense update of whole tables, which threads do speed up."""

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        lr = self.lr_at(epoch)
        d = self.data
        dev = d.ratings.device
        n = len(d)
        steps = self.world.all_reduce_max_int(max(1, math.ceil(n / self.cfg.train.batch_size)))
        g = torch.Generator(device=dev)
        g.manual_seed(phase_seed(self.cfg.train.seed, phase, epoch, self.world.rank))
        perm = torch.randperm(n, generator=g, device=dev)
        bounds = [(k * n) // steps for k in range(steps + 1)]
        denom = max(self.n_global / steps, 1.0)
        self.begin_epoch(lr)
        bar = progress_bar(steps, f"{phase} epoch {epoch}", progress)
        mu = float(self.model.global_mean)  # once per epoch: on CUDA each float() is a sync
        one = self.small_steps_one_thread  # small steps on one CPU thread
        with small_step_threads(dev, math.ceil(n / steps)) if one else nullcontext():
            for s in range(steps):
                idx = perm[bounds[s]:bounds[s + 1]]
                self.step(d.users[idx], d.items[idx], d.ratings[idx], lr=lr, mu=mu, denom=denom)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    def begin_epoch(self, lr: float) -> None:
        """Before the epoch's first step: the optimizer's learning rate is ``lr``."""
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr

    def step(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *,
             lr: float, mu: float, denom: float) -> None:
        """One step on a chunk: ``users`` / ``items`` int64 [b] (items shard-local),
        ``ratings`` float32 [b]; μ as a float; the loss is divided by ``denom``."""
        raise NotImplementedError
