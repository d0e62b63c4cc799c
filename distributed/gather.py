"""Collectives over item shards: reassembling item tables and merging shard top-k lists.

Every rank must call these in the same order with tensors of the same dtype and trailing
shape (they pair up as torch.distributed collectives). Shards may differ in length: rows
are padded to the longest shard for the transfer and cut back on arrival.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_rows(t: torch.Tensor, shards: list[tuple[int, int]], rank: int,
                comm_device: torch.device, dst: int = 0) -> torch.Tensor | None:
    """Concatenate each rank's shard rows on rank ``dst``.

    ``t``: this rank's rows ``[hi - lo, *trail]``; returns the full table
    ``[shards[-1][1], *trail]`` on ``t``'s device at ``dst`` and ``None`` elsewhere.
    """
    lo, hi = shards[rank]
    if t.shape[0] != hi - lo:
        raise ValueError(f"rank {rank} owns {hi - lo} rows [{lo}, {hi}) but passed {t.shape[0]}")
    width = max(h - l for l, h in shards)
    buf = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=comm_device)
    buf[: t.shape[0]] = t.detach().to(comm_device)
    if rank == dst:
        parts = [torch.empty_like(buf) for _ in shards]
        dist.gather(buf, gather_list=parts, dst=dst)
        full = torch.cat([p[: h - l] for p, (l, h) in zip(parts, shards)])
        return full.to(t.device)
    dist.gather(buf, dst=dst)
    return None


def gather_lists(scores: torch.Tensor, items: torch.Tensor, world_size: int, rank: int,
                 comm_device: torch.device, dst: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every rank's ``(scores, items)`` top-k list of the same B users, in rank order, on
    rank ``dst`` (on ``comm_device``; ``None`` elsewhere). ``scores`` float32 [B, k],
    ``items`` int64 [B, k] global item ids, the same shape on every rank."""
    s = scores.detach().to(comm_device).contiguous()
    i = items.detach().to(comm_device, torch.int64).contiguous()
    if rank == dst:
        ss = [torch.empty_like(s) for _ in range(world_size)]
        ii = [torch.empty_like(i) for _ in range(world_size)]
        dist.gather(s, gather_list=ss, dst=dst)
        dist.gather(i, gather_list=ii, dst=dst)
        return list(zip(ss, ii))
    dist.gather(s, dst=dst)
    dist.gather(i, dst=dst)
    return None


def gather_topk(scores: torch.Tensor, items: torch.Tensor, world_size: int, rank: int,
                comm_device: torch.device, dst: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-k over all shards, on rank ``dst`` (``None`` elsewhere).

    ``scores`` float32 [B, k] descending and ``items`` int64 [B, k] global item ids: this
    rank's top-k over its own item shard for the same B users on every rank. Merged with
    :func:`svdfill.kernels.fill.merge_topk` (W·k candidates per user → k; ties → lower id).
    """
    from svdfill.kernels.fill import merge_topk

    parts = gather_lists(scores, items, world_size, rank, comm_device, dst)
    return None if parts is None else merge_topk(parts)
