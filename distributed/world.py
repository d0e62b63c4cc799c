"""Where this process stands among its peers.

The trainer and the fill take a :class:`World` so that one process and many processes
run the same code: the default ``World()`` is rank 0 of 1 and every collective is the
identity. Multi-process worlds (torchrun, Ray Train) subclass it in this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
