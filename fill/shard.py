"""One contiguous item shard of a model on one device: the unit of every sharded fill.

An :class:`ItemShard` holds the replicated user side (P, b_u), the rows ``[lo, hi)`` of the
item side (Q, b_i), μ, and the seen pairs that fall in the shard (made local by
:func:`csr_restrict`). ``topk(rows)`` answers one user block: the block's top-k over the
shard's items, with global item ids. Merging the W shard lists of a block with
:func:`svdfill.kernels.fill.merge_topk` gives exactly the one-process fill (ties → lower
item id). torchrun ranks build one from the loaded model, Ray actors from object-store
arrays (:mod:`svdfill.distributed.sharded_fill` drives them).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

Tensor = torch.Tensor


def csr_restrict(indptr, indices, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The entries in ``[lo, hi)`` made local (``id - lo``): ``(indptr int64 [U+1],
    indices int64 [nnz'])`` as CPU tensors, row order kept. ``indptr``/``indices``: numpy
    arrays or CPU tensors."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices)
    keep = (indices >= lo) & (indices < hi)
    row = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    counts = np.bincount(row[keep], minlength=indptr.size - 1)
    out_ptr = np.zeros(indptr.size, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    return torch.from_numpy(out_ptr), torch.from_numpy(indices[keep].astype(np.int64) - lo)


def _float32(x: Any, device: torch.device) -> Tensor:
    """A float32 tensor of ``x`` on ``device``. Object-store numpy arrays are read-only
    views, which torch will not wrap: those are copied first."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, dtype=np.float32))
    return x.to(device, torch.float32)


def _cpu_tensor(x: Any) -> Tensor:
    """``x`` as a CPU tensor without a copy; a read-only object-store array is wrapped as it
    is (nothing here writes to it)."""
    if isinstance(x, np.ndarray):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(x)
    return torch.as_tensor(x).cpu()


class ItemShard:
    """Items ``[lo, hi)`` of a model on ``device``, answering per-user-block top-k requests.

    state: the five model arrays (torch tensors or numpy arrays, any device):
    ``user_factors [U, d]``, ``user_bias [U]`` (kept whole), ``item_factors [I, d]``,
    ``item_bias [I]`` (rows ``lo..hi-1`` kept), ``global_mean``. seen: the CSR
    ``(indptr [U+1], indices [nnz])`` of global item ids to exclude per user (tensors or
    numpy), or None. k, dtype, memory_budget: as for :func:`svdfill.kernels.fill.fill_topk`
    (``dtype`` is used as given; callers pick it for the device). An empty shard
    (``lo == hi``) answers padding only; a whole one (``lo == 0``, ``hi`` = every item) keeps
    ``seen`` as given, no restricted copy.
    """

    def __init__(self, state: Mapping[str, Any], shard: tuple[int, int], *, k: int,
                 seen=None, device: torch.device | str = "cpu", dtype: str | None = None,
                 memory_budget: int | None = None):
        lo, hi = int(shard[0]), int(shard[1])
        self.lo, self.hi, self.k = lo, hi, k
        self.device = torch.device(device)
        self.dtype, self.memory_budget = dtype, memory_budget
        self.P = _float32(state["user_factors"], self.device)
        self.bu = _float32(state["user_bias"], self.device)
        self.Q = _float32(state["item_factors"][lo:hi], self.device)
        self.bi = _float32(state["item_bias"][lo:hi], self.device)
        self.mu = float(state["global_mean"])
        self.whole = lo == 0 and hi >= int(state["item_factors"].shape[0])
        if seen is None:
            self.seen = None
        elif self.whole:  # every item: the sets as they are (a restricted copy is 2-3x their size)
            self.seen = (_cpu_tensor(seen[0]).to(torch.int64), _cpu_tensor(seen[1]))
        else:
            self.seen = csr_restrict(seen[0], seen[1], lo, hi)

    def topk(self, rows) -> tuple[Tensor, Tensor]:
        """Top-k over this shard for users ``rows`` (int64 [B], tensor or numpy, any order):
        ``(scores float32 [B, k], global item ids int64 [B, k])`` on the shard's device,
        item −1 / score −inf where the shard has fewer than k unseen items."""
        from svdfill.kernels.fill import csr_take, fill_topk

        if isinstance(rows, np.ndarray):  # maybe a read-only object-store view: copy
            rows = torch.from_numpy(np.array(rows, dtype=np.int64))
        rows = torch.as_tensor(rows).to(torch.int64).cpu()
        sub = None if self.seen is None else csr_take(self.seen[0], self.seen[1], rows)
        r = rows.to(self.device)
        return fill_topk(self.P.index_select(0, r), self.Q, self.bu.index_select(0, r), self.bi,
                         self.mu, self.k, sub, item_offset=self.lo, dtype=self.dtype,
                         memory_budget=self.memory_budget)
