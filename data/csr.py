"""Seen items per user as CSR: ``indices[indptr[u]:indptr[u+1]]`` are the items user ``u``
rated, ascending and distinct. Built with one sort and a binary search for the row starts,
no loop per user."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


def _as_long(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.int64)
    return torch.as_tensor(np.asarray(x), dtype=torch.int64)


def build_csr(users: Any, items: Any, n_users: int, *, n_items: int | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr int64 [n_users+1], indices int32 [nnz]) of the distinct (user, item) pairs,
    on the CPU.

    users, items: integer tensors/arrays [n] (any int dtype, any device). Repeated pairs
    appear once. ``n_items`` (optional) bounds-checks items. ``device``: where to sort — the
    CPU by default; a CUDA device sorts 100M pairs in tens of milliseconds where 2 CPU cores
    take ~10 s (falls back to the CPU when the GPU lacks memory).
    """
    u, i = _as_long(users).reshape(-1), _as_long(items).reshape(-1)
    if u.shape != i.shape:
        raise ValueError(f"build_csr: users {tuple(u.shape)} and items {tuple(i.shape)} differ")
    return _sorted_on(device, _csr_of, u, i, n_users, n_items)


def build_csr_pair(users: Any, items: Any, more_users: Any, more_items: Any, n_users: int, *,
                   n_items: int | None = None, device: torch.device | str | None = None
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(build_csr(users, items), build_csr(users ∪ more_users, items ∪ more_items))`` from
    one sort of all the pairs instead of two (the run's training pairs and all its pairs:
    on 2 CPU cores 100M pairs take ~5 s to sort, and this saves one of the two sorts).

    Inputs as :func:`build_csr`; ``more_*`` may overlap ``users, items`` (repeats appear once).
    """
    u, i = _as_long(users).reshape(-1), _as_long(items).reshape(-1)
    mu, mi = _as_long(more_users).reshape(-1), _as_long(more_items).reshape(-1)
    if u.shape != i.shape or mu.shape != mi.shape:
        raise ValueError("build_csr_pair: users and items differ in length")
    pair_of = functools.partial(_csr_pair_of, n_first=u.numel())
    return _sorted_on(device, pair_of, torch.cat([u, mu]), torch.cat([i, mi]), n_users, n_items)


def _csr_pair_of(u: torch.Tensor, i: torch.Tensor, n_users: int, width: int, *, n_first: int):
    key, order = torch.sort(u * width + i)
    first = order < n_first  # which sorted keys came from the first n_first pairs
    del order
    return (_csr_from_keys(torch.unique_consecutive(key[first]), n_users, width),
            _csr_from_keys(torch.unique_consecutive(key), n_users, width))


def _sorted_on(device, csr_fn, u: torch.Tensor, i: torch.Tensor, n_users: int,
               n_items: int | None):
    """Check the ids, then ``csr_fn(u, i, n_users, width)`` on ``device`` (CUDA sorts in
    milliseconds; back on the CPU when the GPU lacks memory) or on the CPU."""
    if u.numel():
        if int(u.min()) < 0 or int(u.max()) >= n_users:
            raise ValueError(f"build_csr: user ids must lie in [0, {n_users})")
        if int(i.min()) < 0 or (n_items is not None and int(i.max()) >= n_items):
            raise ValueError(f"build_csr: item ids must lie in [0, {n_items if n_items is not None else '∞'})")
    width = int(i.max()) + 1 if i.numel() else 1
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and u.numel():
        try:
            return csr_fn(u.to(dev), i.to(dev), n_users, width)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return csr_fn(u, i, n_users, width)


def _csr_from_keys(key: torch.Tensor, n_users: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of sorted, distinct ``user * width + item`` keys."""
    # row starts by binary search in the sorted keys: cheaper than a bincount + cumsum
    starts = torch.arange(n_users + 1, device=key.device, dtype=torch.int64) * width
    indptr = torch.searchsorted(key, starts)
    indices = torch.remainder(key, width).to(torch.int32)
    return indptr.cpu(), indices.cpu()


def _csr_of(u: torch.Tensor, i: torch.Tensor, n_users: int, width: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    key = torch.unique(u * width + i, sorted=True)  # sorts by (user, item) and drops repeats
    return _csr_from_keys(key, n_users, width)


def csr_row(indptr: torch.Tensor, indices: torch.Tensor, user: int) -> torch.Tensor:
    """Items (int32, ascending) seen by ``user``."""
    return indices[int(indptr[user]):int(indptr[user + 1])]


def csr_contains(indptr: torch.Tensor, indices: torch.Tensor, users: Any, items: Any) -> torch.Tensor:
    """bool [n]: whether each (user, item) pair is in the CSR (binary search per row,
    vectorized over pairs)."""
    u, i = _as_long(users).reshape(-1), _as_long(items).reshape(-1)
    lo, hi = indptr[u], indptr[u + 1]
    # global search: rows are sorted, so key (u, i) maps to a sorted 1-D sequence
    width = int(max(int(indices.max()) + 1 if indices.numel() else 1, int(i.max()) + 1 if i.numel() else 1))
    row_of = torch.repeat_interleave(torch.arange(len(indptr) - 1), indptr[1:] - indptr[:-1])
    flat = row_of * width + indices.long()
    q = u * width + i
    pos = torch.searchsorted(flat, q)
    hit = pos < flat.numel()
    out = torch.zeros_like(hit)
    out[hit] = flat[pos[hit]] == q[hit]
    return out & (pos >= lo) & (pos < hi)
