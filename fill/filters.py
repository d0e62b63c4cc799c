"""Item filters of the fill: a global allow / deny list and per-user exclusions.

Applied OUTSIDE the fill kernels, so they hold for the torch tiles, the fused Triton fill
and every sharded path alike, by construction:

- the allowed items (``allowed`` int64 [A], ascending contiguous ids) become the item table:
  ``Q[allowed], b_i[allowed]`` (:func:`compact_state`), the seen CSR remapped to positions in
  ``allowed`` (:func:`compact_items`), and the raw ids decoded through ``item_ids[allowed]``
  (:class:`SubsetItems`, the id map the export sees; :func:`expand_items` for tensors). Since
  ``allowed`` is ascending, "ties → lower position" on the subset IS "ties → lower item id"
  on the originals: the exact tie rule is unchanged.
- per-user exclusions are merged into the seen CSR (:func:`merge_exclusions`), so they are
  dropped exactly like seen items.

:func:`filter_fill_inputs` is the Python API: it returns the ``(state, idmap, seen)`` to hand
to :func:`svdfill.fill.export.export_fill` (or ``export_dataset``, ``ShardedFill.start``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
CSR = tuple[Tensor, Tensor]


def allowed_items(n_items: int, allow=None, deny=None) -> Tensor:
    """The items a fill may return: int64 [A], ascending contiguous ids.

    allow: contiguous ids (any int array) or None for every item; deny: ids removed from it
    (None: none). Duplicates and order in the inputs do not matter.
    """
    keep = torch.zeros(n_items, dtype=torch.bool) if allow is not None else torch.ones(n_items, dtype=torch.bool)
    if allow is not None:
        keep[torch.as_tensor(np.asarray(allow, dtype=np.int64))] = True
    if deny is not None:
        keep[torch.as_tensor(np.asarray(deny, dtype=np.int64))] = False
    return keep.nonzero().flatten()


def csr_from_rows(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> CSR:
    """A CSR (indptr int64 [n_rows+1], indices int32 [nnz]) of the pairs ``(rows, cols)``
    (int64 [n] each, any order, duplicates allowed): rows sorted ascending, deduplicated."""
    # one int64 key per pair; torch.unique sorts, so rows come out grouped and sorted
    keys = torch.unique(rows.to(torch.int64) * n_cols + cols.to(torch.int64))
    r, c = keys // n_cols, keys % n_cols
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(r, minlength=n_rows), 0, out=indptr[1:])
    return indptr, c.to(torch.int32)


def csr_rows(indptr: Tensor) -> Tensor:
    """The row of every CSR entry: int64 [nnz]."""
    indptr = indptr.to(torch.int64)
    return torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr[1:] - indptr[:-1])


def merge_exclusions(seen: CSR | None, users: Tensor, items: Tensor, n_users: int, n_items: int) -> CSR:
    """``seen`` ∪ the pairs ``(users[j], items[j])`` (contiguous ids, int64 [n]) as a CSR
    (indptr int64 [n_users+1], indices int32, rows sorted, deduplicated). ``seen`` None: the
    pairs alone (``--no-exclude-seen`` with an exclusion file)."""
    if seen is None:
        return csr_from_rows(torch.as_tensor(users), torch.as_tensor(items), n_users, n_items)
    r = torch.cat([csr_rows(seen[0]), torch.as_tensor(users, dtype=torch.int64)])
    c = torch.cat([seen[1].to(torch.int64), torch.as_tensor(items, dtype=torch.int64)])
    return csr_from_rows(r, c, n_users, n_items)


def compact_items(allowed: Tensor, seen: CSR | None, n_items: int) -> CSR | None:
    """The seen CSR in positions of ``allowed`` (int64 [A] ascending): entry ``i`` becomes
    ``j`` where ``allowed[j] == i``; entries of items outside ``allowed`` are dropped.
    The map is increasing, so rows stay sorted. indptr int64, indices int32; None → None."""
    if seen is None:
        return None
    pos = torch.full((n_items,), -1, dtype=torch.int64)
    pos[allowed] = torch.arange(allowed.numel())
    new = pos[seen[1].to(torch.int64)]
    keep = new >= 0
    counts = torch.zeros(seen[0].numel() - 1, dtype=torch.int64)
    counts.index_add_(0, csr_rows(seen[0])[keep], torch.ones(int(keep.sum()), dtype=torch.int64))
    indptr = torch.zeros(seen[0].numel(), dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    return indptr, new[keep].to(torch.int32)


def expand_items(idx: Tensor, allowed: Tensor) -> Tensor:
    """Fill results on the compacted table back to original item ids: ``allowed[idx]``
    (int64, same shape), −1 padding kept."""
    a = allowed.to(idx.device)
    return torch.where(idx >= 0, a[idx.clamp(min=0)], idx)


def compact_state(state: dict, allowed: Tensor) -> dict:
    """The model state with only the allowed item rows (``item_factors``, ``item_bias``);
    the other tensors shared, not copied."""
    from svdfill.kernels.model import ITEM_PARAMS

    out = dict(state)
    for name in ITEM_PARAMS:
        out[name] = state[name].index_select(0, allowed.to(state[name].device))
    return out


class SubsetItems:
    """The id map an export of the compacted item table sees: ``item_ids`` are the raw ids
    of ``allowed`` (so position j decodes to ``allowed[j]``'s raw id); everything else is the
    model's id map."""

    def __init__(self, idmap: Any, allowed: Tensor):
        self._idmap = idmap
        self.item_ids = idmap.item_ids[allowed.numpy()]
        self.n_items = int(allowed.numel())

    def decode_items(self, idx: Any) -> np.ndarray:
        """Raw ids of positions in the compacted table."""
        return self.item_ids[np.asarray(idx, dtype=np.int64)]

    def __getattr__(self, name: str):
        return getattr(self._idmap, name)


def filter_fill_inputs(state: dict, idmap: Any, seen: CSR | None, *, allow=None, deny=None,
                       exclude: tuple | None = None):
    """``(state, idmap, seen, allowed)`` with the filters applied, for any fill path.

    allow / deny: contiguous item ids (or None); exclude: ``(users, items)`` contiguous ids
    int64 [n] of per-user exclusions (or None); idmap None: tensors only (the returned id
    map is then None; map indices back with :func:`expand_items`). ``allowed`` is None when no item filter was
    given (state, id map unchanged). Raises ValueError when no item is left.
    """
    n_users, n_items = state["user_factors"].shape[0], state["item_factors"].shape[0]
    if exclude is not None:
        seen = merge_exclusions(seen, exclude[0], exclude[1], n_users, n_items)
    if allow is None and deny is None:
        return state, idmap, seen, None
    allowed = allowed_items(n_items, allow, deny)
    if allowed.numel() == 0:
        raise ValueError("the item filters leave no item to fill")
    sub_map = None if idmap is None else SubsetItems(idmap, allowed)
    return compact_state(state, allowed), sub_map, compact_items(allowed, seen, n_items), allowed
