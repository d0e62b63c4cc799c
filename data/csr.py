"""Seen items per user as CSR: ``indices[indptr[u]:indptr[u+1]]`` are the items user ``u``
rated, ascending and distinct. Built with one sort and a binary search for the row starts,
no loop per user."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_int(x: Any) -> torch.Tensor:
    """A 1-D integer tensor, on the device and in the dtype it has (numpy arrays: the CPU)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        t = t.to(torch.int64)
    return t.reshape(-1)


def build_csr(users: Any, items: Any, n_users: int, *, n_items: int | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr int64 [n_users+1], indices int32 [nnz]) of the distinct (user, item) pairs,
    on the CPU.

    users, items: integer tensors/arrays [n] (any int dtype, any device). Repeated pairs
    appear once. ``n_items`` (optional) bounds-checks items. ``device``: where to sort — the
    CPU by default; a CUDA device sorts 100M pairs in tens of milliseconds where 2 CPU cores
    take seconds (falls back to the CPU when the GPU lacks memory).
    """
    u, i = _as_int(users), _as_int(items)
    if u.shape != i.shape:
        raise ValueError(f"build_csr: users {tuple(u.shape)} and items {tuple(i.shape)} differ")
    shift = _check_ids(u, i, n_users, n_items)

    def csr(dev: torch.device):
        key, _ = _sorted_keys([(u, i)], shift, n_users, dev)
        return _csr_from_keys(_distinct(key), n_users, shift)
    return _on(device, csr)


def build_csr_pair(users: Any, items: Any, more_users: Any, more_items: Any, n_users: int, *,
                   n_items: int | None = None, device: torch.device | str | None = None
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(build_csr(users, items), build_csr(users ∪ more_users, items ∪ more_items))`` from
    one sort of all the pairs instead of two (the run's training pairs and all its pairs).

    Inputs as :func:`build_csr`; ``more_*`` may overlap ``users, items`` (repeats appear once).
    """
    u, i = _as_int(users), _as_int(items)
    mu, mi = _as_int(more_users), _as_int(more_items)
    if u.shape != i.shape or mu.shape != mi.shape:
        raise ValueError("build_csr_pair: users and items differ in length")
    shift = max(_check_ids(u, i, n_users, n_items), _check_ids(mu, mi, n_users, n_items))

    def pair(dev: torch.device):
        # the lowest bit tags where a pair came from (0: the first set): one sort of the
        # values, no argsort (which costs ~3× as much on a CPU), gives both CSRs
        key, tagged = _sorted_keys([(u, i), (mu, mi)], shift, n_users, dev)
        first = key[(key & 1) == 0] >> 1 if tagged else key
        return (_csr_from_keys(_distinct(first), n_users, shift),
                _csr_from_keys(_distinct(key >> 1 if tagged else key), n_users, shift))
    return _on(device, pair)


def _check_ids(u: torch.Tensor, i: torch.Tensor, n_users: int, n_items: int | None) -> int:
    """Bounds-check the ids; the bits an item id takes (the key's item field width)."""
    if u.numel() == 0:
        return 1
    if int(u.min()) < 0 or int(u.max()) >= n_users:
        raise ValueError(f"build_csr: user ids must lie in [0, {n_users})")
    top = int(i.max())
    if int(i.min()) < 0 or (n_items is not None and top >= n_items):
        raise ValueError(f"build_csr: item ids must lie in [0, {n_items if n_items is not None else '∞'})")
    return max(1, top.bit_length())


def _sorted_keys(parts: list[tuple[torch.Tensor, torch.Tensor]], shift: int, n_users: int,
                 dev: torch.device) -> tuple[torch.Tensor, bool]:
    """Sorted int64 keys ``user << shift | item`` of every (users, items) part on ``dev``;
    with several parts each key is shifted once more and tagged with 1 unless it came from
    the first part. Power-of-two fields: the item is ``key & mask``, not an int64 division
    (which alone cost ~2.5 s per 100M keys on a CPU). Returns (keys, tagged)."""
    tagged = len(parts) > 1 and any(p[0].numel() for p in parts[1:])
    # bounded by n_users, not the largest id (no pass over the ids): the keys of user
    # n_users - 1 and the row starts up to n_users << shift must fit
    if max((n_users - 1).bit_length() + int(tagged), n_users.bit_length()) + shift > 63:
        raise ValueError(f"build_csr: {n_users} users and {shift}-bit item ids do not fit one "
                         f"int64 key")
    if not tagged:
        parts = parts[:1]
    keys = []
    for n, (u, i) in enumerate(parts):
        k = u.to(dev, torch.int64) << shift
        k |= i.to(dev, torch.int64)
        if tagged:
            k <<= 1
            if n:
                k |= 1
        keys.append(k)
    runs = dev.type == "cpu" and all(_is_sorted(k) for k in keys)
    key = keys[0] if len(keys) == 1 else torch.cat(keys)
    del keys
    if not runs:
        return torch.sort(key).values, tagged
    # ratings often come grouped by user in id order (MovieLens-1M's file, the synthetic
    # generator, a train/val split of either): then the parts are sorted runs, and numpy's
    # stable sort (timsort) merges them in one pass — 0.5 s for 100M keys where a full sort
    # takes ~5 s; one part is sorted already
    if len(parts) > 1:
        key = torch.from_numpy(np.sort(key.numpy(), kind="stable"))
    return key, tagged


def _is_sorted(k: torch.Tensor) -> bool:
    return k.numel() < 2 or bool((k[1:] >= k[:-1]).all())


def _distinct(key: torch.Tensor) -> torch.Tensor:
    """Sorted ``key`` without repeats (returned as is when it has none, the usual case)."""
    if key.numel() < 2:
        return key
    same = key[1:] == key[:-1]
    if not bool(same.any()):
        return key
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[1:] = ~same
    return key[keep]


def _on(device, csr_fn):
    """``csr_fn(device)`` on ``device`` (CUDA sorts in milliseconds; back on the CPU when the
    GPU lacks memory) or on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return csr_fn(dev)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return csr_fn(torch.device("cpu"))


def _csr_from_keys(key: torch.Tensor, n_users: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of sorted, distinct ``user << shift | item`` keys."""
    # row starts by binary search in the sorted keys: cheaper than a bincount + cumsum
    starts = torch.arange(n_users + 1, device=key.device, dtype=torch.int64) << shift
    indptr = torch.searchsorted(key, starts)
    indices = (key & ((1 << shift) - 1)).to(torch.int32)
    return indptr.cpu(), indices.cpu()
