"""Warm start (``train.init_from = RUN``): begin training from an earlier model's rows.

Rows are matched by raw id through both id maps, so the new data may add or drop users and
items (contiguous ids differ between the two runs). A user or item the old model knows
starts from its old factors and bias; a new one keeps the solver's usual initialization.
μ is the new data's mean (the model keeps μ fixed at it); the old biases are copied as they
are — the μ shift of a few percent more data is well inside what the first sweep or epoch
corrects. Optimizer state is not carried (a new run's Adam moments start at zero).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from svdfill.errors import UserError


@torch.no_grad()
def warm_start(model: torch.nn.Module, init_from: str, idmap_state: dict | None,
               lo: int, hi: int) -> dict[str, int]:
    """Copy the rows of the model in ``init_from`` into ``model`` in place.

    model: the solver's :class:`~svdfill.kernels.model.BiasedMF` (all users; items
    ``[lo, hi)`` of the new data's catalogue). idmap_state: the new data's
    :class:`~svdfill.data.idmap.IdMap` state (``None``: refused, the ids cannot be matched).
    Returns ``{"users": kept, "items": kept}`` (items of this shard). Raises
    :class:`UserError` on a missing map or a different factor count;
    :class:`~svdfill.checkpoint.CheckpointError` on a missing or bad model.
    """
    from svdfill.checkpoint import load_model
    from svdfill.data.idmap import IdMap

    if idmap_state is None:
        raise UserError("train.init_from: the data's id map is not known here, so rows cannot be "
                        "matched by id")
    old = load_model(init_from)
    new = IdMap.from_state(idmap_state)
    d_old, d = old.state["user_factors"].shape[1], model.user_factors.shape[1]
    if d_old != d:
        raise UserError(f"train.init_from = {init_from!r}: that model has {d_old} factors, this "
                        f"run model.factors = {d}")
    dev = model.user_factors.device
    kept = {}
    for side, ids, fk, bk in (("users", new.user_ids, "user_factors", "user_bias"),
                              ("items", new.item_ids[lo:hi], "item_factors", "item_bias")):
        enc = old.idmap.encode_users(ids) if side == "users" else old.idmap.encode_items(ids)
        mine = torch.from_numpy(np.flatnonzero(enc >= 0)).to(dev)
        theirs = torch.from_numpy(enc[enc >= 0])
        getattr(model, fk)[mine] = old.state[fk][theirs].to(dev)
        getattr(model, bk)[mine] = old.state[bk][theirs].to(dev)
        kept[side] = int(mine.numel())
    return kept


def describe(kept: dict[str, int], n_users: int, n_items: int, init_from: Any) -> str:
    """The log line of a warm start."""
    return (f"warm start from {init_from}: {kept['users']:,} of {n_users:,} users and "
            f"{kept['items']:,} of {n_items:,} items start from its rows")
