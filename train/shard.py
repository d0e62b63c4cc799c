"""This rank's share of a training phase: its ratings on the device, the figures every rank
agrees on (μ, rating counts, the global rating count), and the conversions between its
shard of the item tables and the full tables a checkpoint holds.

For the default single-process ``World()`` the shard is the whole catalogue and every
all-reduce is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from svdfill.data.dataset import Ratings
from svdfill.distributed.world import World
from svdfill.kernels.model import ITEM_PARAMS


def phase_seed(seed: int, phase: str, epoch: int, rank: int) -> int:
    """Seed of the generator behind one epoch's shuffle (and the Gibbs draws): from
    ``(seed, phase, epoch, rank)`` alone, so a resumed run reshuffles exactly as an
    uninterrupted one without carrying generator state."""
    tag = 1 if phase == "select" else 2
    return (int(seed) * 1_000_003 + tag * 7_919_009 + epoch * 104_729 + rank * 15_485_863) % (2**63 - 1)


@dataclass
class DeviceRatings:
    """Local ratings on the device: ``users`` / ``items`` int64 [n] (items shard-local),
    ``ratings`` float32 [n]."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor

    @classmethod
    def of(cls, r: Ratings, device: torch.device) -> "DeviceRatings":
        return cls(r.users.to(device, torch.int64), r.items.to(device, torch.int64),
                   r.ratings.to(device, torch.float32))

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    def sample(self, m: int, seed: int) -> "DeviceRatings":
        """``m`` ratings drawn uniformly with replacement by a generator seeded with ``seed``,
        in storage order (gathers stay local); ``self`` when ``m`` is 0 or not below ``len``."""
        n = len(self)
        if m <= 0 or m >= n:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (m,), generator=g).sort().values.to(self.ratings.device)
        return DeviceRatings(self.users[idx], self.items[idx], self.ratings[idx])


@dataclass
class TrainShard:
    """What a solver is built on: this rank's ratings and the figures all ranks share.

    ratings: the local ratings (items ``[lo, hi)`` made local). n_users: all users (the user
    tables are replicated). n_items: the whole catalogue. global_mean: μ over every rank's
    ratings. n_global: the number of ratings over every rank (float). user_counts: float64
    [n_users], ratings per user over every rank; item_counts: int64 [hi − lo], ratings per
    local item.
    """

    ratings: DeviceRatings
    n_users: int
    n_items: int
    lo: int
    hi: int
    global_mean: float
    n_global: float
    user_counts: torch.Tensor
    item_counts: torch.Tensor

    @property
    def n_items_local(self) -> int:
        return self.hi - self.lo

    @classmethod
    def build(cls, world: World, train: Ratings, n_items: int, lo: int, hi: int) -> "TrainShard":
        """From the local ratings ``train`` (items already local); collective at W > 1."""
        dev = world.device
        data = DeviceRatings.of(train, dev)
        mu = global_mean(world, train, dev)
        uc, ic = rating_counts(world, train, train.n_users, hi - lo, dev)
        n_global = world.all_reduce_sum(torch.tensor([float(len(data))], dtype=torch.float64))
        return cls(data, train.n_users, n_items, lo, hi, mu, float(n_global[0]), uc, ic)


def rating_counts(world: World, r: Ratings, n_users: int, n_items_local: int,
                  dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global rating count per user (float64 [n_users], all-reduced) and local count per
    shard item (int64 [n_items_local])."""
    uc = torch.bincount(r.users.to(dev, torch.int64), minlength=n_users).to(torch.float64)
    world.all_reduce_sum(uc)
    ic = torch.bincount(r.items.to(dev, torch.int64), minlength=n_items_local)
    return uc, ic


def global_mean(world: World, r: Ratings, dev: torch.device) -> float:
    """μ over every rank's ratings (float64 sums); 0 when there are none."""
    s = torch.tensor([float(r.ratings.to(torch.float64).sum()), float(len(r))],
                     dtype=torch.float64, device=dev)
    world.all_reduce_sum(s)
    return float(s[0] / s[1]) if s[1] > 0 else 0.0


def n_global(world: World, r: Ratings) -> int:
    """The number of ratings over every rank."""
    t = torch.tensor([float(len(r))], dtype=torch.float64)
    world.all_reduce_sum(t)
    return int(t[0])


def gather_full(world: World, local: dict[str, torch.Tensor], n_items: int,
                opt_tables: dict[str, dict[str, Any]] | None = None):
    """Full-catalogue copies of a local model state (and optimizer tables) on CPU on the
    main rank, ``(state, optimizer)``; ``(None, None)`` elsewhere. Every rank must call it.
    ``optimizer`` is None when ``opt_tables`` is."""
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


def slice_state(state: dict[str, torch.Tensor], lo: int, hi: int, device,
                item_keys=ITEM_PARAMS) -> dict[str, torch.Tensor]:
    """``state`` on ``device`` with the rows ``[lo, hi)`` of its ``item_keys`` tables."""
    return {k: (v[lo:hi] if k in item_keys else v).to(device) for k, v in state.items()}
