"""Similar items: each item's top-k neighbours by cosine of the item factors (or their dot
product), through the fill engine.

A neighbour list is a fill with the item table on both sides: ``fill_topk`` scores
``μ + b_u + b_i + p_u·q_i``, so with ``P = Q = Q̂`` (the rows of ``Q`` scaled to unit length
for ``cosine``, ``Q`` itself for ``dot``), zero biases and ``μ = 0`` the score is
``q̂_a·q̂_b``, and a "seen set" holding only the diagonal excludes each item from its own
list. Everything the fill has comes with it: tiles sized from the memory budget, the fused
Triton kernel on CUDA, the exact tie rule (score descending, then the lower item id), and the
resumable atomic Parquet export (:func:`export_similar` feeds :func:`plan_fill`'s blocks to
the same :class:`ResumableParquetWriter`, only the columns renamed).

Zero vectors (an item whose factors are all 0, e.g. never trained): its cosine with every
item is defined as 0 (the unit vector is left at 0 instead of dividing by 0), so it is
neither near nor far; its own list holds the k lowest other item ids, score 0.

Exactness: the scores are the float32 dot products of the float32 unit vectors (each
rounded once from a float64 division), ranked exactly by the tie rule; where the unit vectors
are exact (norms that are powers of two) they equal a float64 brute force bit for bit.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

Tensor = torch.Tensor

METRICS = ("cosine", "dot")


def unit_rows(Q: Tensor) -> Tensor:
    """``Q`` float32 [I, d] with each row scaled to length 1 (zero rows stay 0): float32
    [I, d] on ``Q``'s device. Norm and division in float64, so each entry is rounded once."""
    q = Q.to(torch.float64)
    norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    return torch.where(norm > 0, q / torch.where(norm > 0, norm, 1.0), 0.0).to(torch.float32)


def diagonal_csr(n: int) -> tuple[Tensor, Tensor]:
    """The seen set that excludes item ``i`` from row ``i``: (indptr int64 [n+1], indices
    int32 [n])."""
    return torch.arange(n + 1, dtype=torch.int64), torch.arange(n, dtype=torch.int32)


def neighbour_state(state: dict, metric: str = "cosine", device=None) -> dict:
    """The five fill tensors whose top-k is the neighbour lists: ``user_factors`` =
    ``item_factors`` = ``Q̂`` float32 [I, d], zero biases float32 [I], ``global_mean`` 0,
    on ``device`` (default: where ``state`` is)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    Q = state["item_factors"]
    Q = Q.to(device if device is not None else Q.device, torch.float32)
    side = unit_rows(Q) if metric == "cosine" else Q
    zeros = torch.zeros(Q.shape[0], dtype=torch.float32, device=Q.device)
    return {"user_factors": side, "item_factors": side, "user_bias": zeros, "item_bias": zeros,
            "global_mean": torch.tensor(0.0)}


def similar_items(state: dict, k: int, *, metric: str = "cosine", items=None, device=None,
                  dtype: str | None = None, memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-k neighbours of items (itself excluded), exact, ties to the lower item id.

    state: the model's five tensors (only ``item_factors`` float32 [I, d] is read); k >= 1
    (more than I − 1 leaves padding); metric: ``cosine`` (of the item factors; 0 with a zero
    vector) or ``dot``; items: contiguous item ids (int64 [n]) whose lists are wanted, or
    None for all items in id order; device / dtype / memory_budget as for ``fill_topk``.

    Returns ``(scores float32 [n, k], neighbours int64 [n, k])`` on ``device``, each row by
    score descending then item ascending; missing entries are (−inf, −1).
    """
    from svdfill.kernels.fill import csr_take, fill_topk

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ns = neighbour_state(state, metric, device)
    side = ns["user_factors"]
    seen = diagonal_csr(side.shape[0])
    queries = side
    if items is not None:
        rows = torch.as_tensor(items, dtype=torch.int64).cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= side.shape[0]):
            raise IndexError(f"item ids outside [0, {side.shape[0]})")
        seen = csr_take(seen[0], seen[1], rows)
        queries = side.index_select(0, rows.to(side.device))
    no_bias = torch.zeros(queries.shape[0], dtype=torch.float32, device=side.device)
    return fill_topk(queries, side, no_bias, ns["item_bias"], 0.0, k, seen, dtype=dtype,
                     memory_budget=memory_budget)


class _ItemsAsUsers:
    """The id map :func:`plan_fill` sees for a neighbour export: items on both axes."""

    def __init__(self, idmap: Any):
        self.user_ids = self.item_ids = idmap.item_ids


def similar_schema(plan_schema, meta: dict):
    """The fill schema with the columns of a neighbour list: item_id, neighbor_id (raw id
    type), score float32, rank int16; file metadata ``meta``."""
    import pyarrow as pa

    fields = [plan_schema.field(0).with_name("item_id"), plan_schema.field(1).with_name("neighbor_id"),
              plan_schema.field(2), plan_schema.field(3)]
    return pa.schema(fields, metadata=meta)


def export_similar(state: dict, idmap: Any, out: str | os.PathLike, *, k: int, metric: str = "cosine",
                   items=None, device=None, dtype: str | None = None,
                   memory_budget: int | None = None, block: int | None = None,
                   restart: bool = False, quiet: bool = False,
                   provenance: dict | None = None, sharded=None) -> dict:
    """Write each item's top-k neighbours to the Parquet file ``out``: columns ``item_id``,
    ``neighbor_id`` (the model's raw item ids), ``score`` float32, ``rank`` int16 (1-based);
    one row group per block of items; atomic (temp name, renamed) and resumable (a killed
    export resumes at its first unfinished block when rerun with the same arguments).

    items: contiguous item ids (int64 numpy [n]) whose lists are written, in that order, or
    None for all; k: 1..min(I, 32767) (the self-exclusion leaves at most I − 1 per item);
    provenance: extra ``svdfill.*`` metadata (model hash, …) that also keys the resume.
    sharded: a :class:`svdfill.distributed.sharded_fill.ShardedFill` (torchrun ranks, Ray
    actors), not yet started: each holds an item shard of the neighbour tables and each block's
    lists are merged from theirs (the same file, bit for bit, whatever W is).
    Returns a summary dict (path, items, blocks, resumed_at, rows, seconds).
    """
    from svdfill.data.export import ResumableParquetWriter
    from svdfill.fill.export import plan_fill, write_blocks

    t0 = time.perf_counter()
    ns = neighbour_state(state, metric, device)
    n_items = ns["item_factors"].shape[0]
    plan = plan_fill(ns, _ItemsAsUsers(idmap), k=k, seen=diagonal_csr(n_items), users=items,
                     device=device, dtype=dtype, memory_budget=memory_budget, user_block=block,
                     provenance=provenance)
    # what the fill's metadata calls users are the query items here
    meta = dict(plan.meta)
    meta.pop("svdfill.exclude_seen", None)
    meta["svdfill.mode"] = "similar"
    meta["svdfill.metric"] = metric
    meta["svdfill.n_query_items"] = meta.pop("svdfill.n_users")
    meta["svdfill.item_block"] = meta.pop("svdfill.user_block")
    plan.schema = similar_schema(plan.schema, meta)  # plan.table() builds rows with it
    params = dict(meta, device=plan.params["device"], memory_budget=plan.params["memory_budget"])

    compute = plan.compute
    if sharded is not None:  # item shards on other processes: the same blocks, merged lists
        sharded.start(ns, diagonal_csr(n_items), k=k, device=plan.device, dtype=dtype,
                      memory_budget=memory_budget)
        remote = sharded.blocks(plan.rows_of, plan.n_blocks)
        compute = lambda b: plan.table(plan.rows_of(b), *remote(b))  # noqa: E731

    writer = ResumableParquetWriter(out, plan.schema, params, plan.n_blocks, restart=restart)
    first = writer.first_block
    path, rows = write_blocks(writer, compute, plan.n_blocks, out, desc="similar", quiet=quiet)
    return {"path": str(path), "items": plan.n_sel, "blocks": plan.n_blocks, "resumed_at": first,
            "rows_computed": rows, "seconds": time.perf_counter() - t0, "item_block": plan.block}
