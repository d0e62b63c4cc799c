"""Where this process stands among its peers.

The trainer and the fill take a :class:`World` so that one process and many processes
run the same code: the default ``World()`` is rank 0 of 1 and every collective is the
identity. Multi-process worlds (torchrun, Ray Train) subclass it in this package.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def core_share(local_processes: int) -> int:
    """Intra-op threads for each of ``local_processes`` processes on this machine: an equal
    share of its cores, at least 1 (torchrun children and Ray Train workers)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_processes))


@dataclass
class World:
    """Rank ``rank`` of ``world_size`` on ``device``, owning items ``[item_lo, item_hi)``.

    ``item_hi = None`` means "to the last item" (the whole catalogue, world size 1).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    item_lo: int = 0
    item_hi: int | None = None

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files."""
        return self.rank == 0

    def item_range(self, n_items: int) -> tuple[int, int]:
        """``(lo, hi)`` of the contiguous item shard this rank owns."""
        return self.item_lo, n_items if self.item_hi is None else self.item_hi

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward through (DDP over the user table when W > 1)."""
        return model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place and return it (identity for one process)."""
        return t

    def all_reduce_max_int(self, x: int) -> int:
        """Largest ``x`` over ranks (e.g. the common number of steps per epoch)."""
        return x

    def barrier(self) -> None:
        """Wait for every rank."""

    def gather_items(self, tables: dict[str, torch.Tensor], n_items: int) -> dict[str, torch.Tensor] | None:
        """Full item-indexed tables (first dim = items) on the main rank, ``None`` elsewhere.

        Each rank passes its shard rows ``[lo, hi)``; one process already holds everything.
        """
        return tables

    def broadcast_object(self, obj):
        """``obj`` from the main rank, on every rank."""
        return obj

    def report_epoch(self, metrics: dict, checkpoint_dir=None) -> None:
        """Called by the trainer on every rank after each epoch, once its files are written.

        ``checkpoint_dir``: the folder holding the resumable ``checkpoint.pt`` when one was
        written this epoch (main rank), else ``None``. No-op here; the Ray Train world
        reports metrics and the checkpoint to Ray.
        """

    def with_shard(self, lo: int, hi: int | None) -> "World":
        """This world owning items ``[lo, hi)`` instead."""
        return dataclasses.replace(self, item_lo=lo, item_hi=hi)


class DistWorld(World):
    """A rank of a torch.distributed process group (torchrun or Ray Train).

    Collectives run on ``comm_device`` (the rank's GPU under nccl, CPU under gloo); tensors
    on another device are copied there and back. ``shards`` lists every rank's item range,
    so the main rank can reassemble full item tables.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, backend: str,
                 shards: list[tuple[int, int]] | None = None, sparse_users: bool | None = None):
        lo, hi = shards[rank] if shards else (0, None)
        super().__init__(rank=rank, world_size=world_size, device=device, item_lo=lo, item_hi=hi)
        self.backend = backend
        self.shards = list(shards) if shards else None
        # gloo can all-reduce sparse gradients; nccl cannot (dense there).
        self.sparse_users = (backend == "gloo") if sparse_users is None else sparse_users
        self.comm_device = device if backend == "nccl" else torch.device("cpu")

    def with_shards(self, shards: list[tuple[int, int]]) -> "DistWorld":
        """This rank owning ``shards[rank]``, knowing every rank's range."""
        if len(shards) != self.world_size:
            raise ValueError(f"{len(shards)} shards for a world of {self.world_size}")
        return type(self)(self.rank, self.world_size, self.device, self.backend, shards,
                          self.sparse_users)

    def with_shard(self, lo: int, hi: int | None) -> "World":
        raise TypeError("a DistWorld takes every rank's shard: use with_shards(shards)")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from svdfill.distributed.ddp import wrap_user_ddp

        return wrap_user_ddp(model, self.device, sparse=self.sparse_users)

    def _on_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.comm_device else t.to(self.comm_device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        c = self._on_comm(t)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        if c is not t:
            t.copy_(c)
        return t

    def all_reduce_max_int(self, x: int) -> int:
        c = torch.tensor([int(x)], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        return int(c.item())

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def gather_items(self, tables: dict[str, torch.Tensor], n_items: int) -> dict[str, torch.Tensor] | None:
        if self.shards is None:
            raise RuntimeError("DistWorld.gather_items needs the shard layout (with_shards)")
        if self.shards[-1][1] != n_items:
            raise ValueError(f"shards cover {self.shards[-1][1]} items, tables have {n_items}")
        from svdfill.distributed.gather import gather_rows

        # Same order on every rank: the collectives must pair up.
        full = {name: gather_rows(t, self.shards, self.rank, self.comm_device)
                for name, t in sorted(tables.items())}
        return full if self.is_main else None

    def broadcast_object(self, obj):
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device if self.backend == "nccl" else None)
        return box[0]
