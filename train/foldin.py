"""Fold new or changed users into a trained model without retraining it.

:func:`fold_in` solves ``p_u, b_u`` of every user named in a ratings file with the items
held fixed — the user half of one ALS sweep (:func:`svdfill.kernels.foldin.solve_users`),
regularized by the run's own ``train.reg_factors``, ``train.reg_bias``,
``train.als.reg_exponent`` and ``train.als.bias_reg_exponent``. For an ALS model that is the
model's own solve. For a Gibbs model it is the MAP estimate under the same ridge penalties
the chain's ALS warm start used (not a posterior draw), and for an SGD/Adam model with the
default exponents (1, 1) it minimises the very per-rating L2 objective the model was trained
on; both are reasonable fold-ins, not the trainer's exact update.

Semantics (kept simple on purpose):

- A user in the file is solved from the file's ratings only: a known user's row is replaced
  ("changed user"), an unknown one is added. Every other user row, every item row, μ and
  the item biases are copied bit for bit.
- Ratings of items the model does not know are skipped and counted (``strict`` refuses
  them); a user left with no known item is skipped too (a known user keeps its row).
- The id map stays sorted (an :class:`~svdfill.data.idmap.IdMap` invariant): the new map is
  the sorted union of old and new user ids, and the old rows move to their new positions.
  Contiguous user ids therefore shift; raw ids are what the fill writes, so nothing
  downstream notices.
- The seen sets move with their users; a folded user's rows gain the items it rated in the
  file (both ``train`` and ``all``), so the fill does not recommend them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from svdfill.data.errors import DataError
from svdfill.data.idmap import IdMap, as_id_array
from svdfill.errors import UserError
from svdfill.kernels.foldin import solve_users

FOLDIN_FORMAT = "svdfill-foldin/1"


@dataclass
class FoldIn:
    """A folded-in model, ready for :func:`write_foldin_run`.

    state: the five model tensors on CPU (float32; ``user_factors [U', d]``, ``user_bias
    [U']`` over the new map, item tensors and μ the old ones). idmap: the new map (users
    ``U' ≥ U``). seen: ``{"train": CSR, "all": CSR}`` over ``U'`` users (indptr int64
    ``[U'+1]``, indices int32). users: raw ids of the folded users (sorted). info: the
    counts written to ``summary.json``.
    """

    state: dict[str, torch.Tensor]
    idmap: IdMap
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]]
    users: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def regularization(config: Any) -> dict[str, float]:
    """The fold-in penalties of a run's :class:`~svdfill.config.Config`: ``reg_factors``,
    ``reg_bias``, ``reg_exponent``, ``bias_reg_exponent`` (keywords of ``solve_users``)."""
    t = config.train
    return {"reg_factors": float(t.reg_factors), "reg_bias": float(t.reg_bias),
            "reg_exponent": float(t.als.reg_exponent),
            "bias_reg_exponent": float(t.als.bias_reg_exponent)}


def fold_in(model: Any, raw: Any, *, seen: dict | None = None, strict: bool = False,
            device: str | torch.device = "cpu", budget_elements: int | None = None) -> FoldIn:
    """Fold the users of ``raw`` into ``model``.

    model: a :class:`~svdfill.checkpoint.LoadedModel`. raw: a
    :class:`~svdfill.data.readers.RawRatings` (raw ids, float32 ratings). seen: the run's
    ``load_seen`` dict, or ``None`` (old users then have empty seen rows). strict: raise
    :class:`DataError` on items the model does not know instead of skipping them.
    device: where the solves run. Raises :class:`UserError` when no rating names a known
    item, :class:`DataError` for user ids of the wrong kind.
    """
    src = raw.source or "ratings"
    old = model.idmap
    item_codes = np.asarray(old.encode_items(raw.items), dtype=np.int64)
    known = item_codes >= 0
    n_unknown = int((~known).sum())
    unknown_items = int(np.unique(as_id_array(raw.items[~known])).size) if n_unknown else 0
    if n_unknown and strict:
        first = int(np.flatnonzero(~known)[0])
        raise DataError(f"{src}: {n_unknown} ratings name {unknown_items} items the model does not "
                        f"know (first: item {raw.items[first]!r}, rating #{first + 1}); rerun "
                        f"without --strict to skip them")
    if not known.any():
        raise UserError(f"{src}: none of its {len(raw)} ratings names an item the model knows: "
                        f"nothing to fold in")
    users_raw = _like(as_id_array(raw.users[known]), old.user_ids, src)
    all_users = np.unique(_like(as_id_array(raw.users), old.user_ids, src))
    folded, rows = np.unique(users_raw, return_inverse=True)

    st = model.state
    dev = torch.device(device)
    P, bu = solve_users(st["item_factors"].to(dev), st["item_bias"].to(dev), st["global_mean"].to(dev),
                        torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(item_codes[known]),
                        torch.as_tensor(np.asarray(raw.ratings)[known], dtype=torch.float32),
                        folded.size, **regularization(model.config), budget_elements=budget_elements)

    new_map = IdMap(np.unique(np.concatenate([old.user_ids, folded])), old.item_ids)
    old_pos = torch.from_numpy(new_map.encode_users(old.user_ids))
    fold_pos = torch.from_numpy(new_map.encode_users(folded))
    n2, d = new_map.n_users, st["user_factors"].shape[1]
    uf = st["user_factors"].new_zeros(n2, d)
    ub = st["user_bias"].new_zeros(n2)
    uf[old_pos] = st["user_factors"]  # a copy: untouched users keep their rows bit for bit
    ub[old_pos] = st["user_bias"]
    uf[fold_pos] = P.cpu()
    ub[fold_pos] = bu.cpu()
    state = {k: v.clone() for k, v in st.items()}
    state["user_factors"], state["user_bias"] = uf, ub

    new_rows = fold_pos[torch.from_numpy(rows.astype(np.int64))]
    new_items = torch.from_numpy(item_codes[known])
    seen2 = {key: _move_csr(None if seen is None else seen[key], old_pos, n2, new_rows, new_items,
                            old.n_items)
             for key in ("train", "all")}
    n_new = int(np.sum(old.encode_users(folded) < 0))
    info = {"format": FOLDIN_FORMAT, "source": str(src), "ratings": len(raw),
            "ratings_used": int(known.sum()), "ratings_skipped": n_unknown,
            "unknown_items": unknown_items, "users_folded": int(folded.size),
            "users_new": n_new, "users_refit": int(folded.size) - n_new,
            "users_skipped": int(all_users.size - folded.size),
            "users_before": old.n_users, "users_after": n2,
            "regularization": regularization(model.config), "solver": model.config.train.solver}
    return FoldIn(state=state, idmap=new_map, seen=seen2, users=folded, info=info)


def _like(ids: np.ndarray, table: np.ndarray, src: str) -> np.ndarray:
    """``ids`` in the dtype of the model's user ids (int64 or str), so the maps can merge."""
    if ids.dtype == table.dtype:
        return ids
    if table.dtype != np.int64:
        return np.asarray([str(v) for v in ids], dtype=object)
    try:
        out = np.asarray([int(v) for v in ids], dtype=np.int64)
    except (ValueError, OverflowError):
        out = None
    if out is None or any(str(a) != b for a, b in zip(out, ids)):
        raise DataError(f"{src}: user ids are text but the model's user ids are integers; "
                        f"fold-in cannot mix the two")
    return out


def _move_csr(csr: tuple | None, old_pos: torch.Tensor, n2: int, add_rows: torch.Tensor,
              add_items: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seen CSR over the new map: old row ``u`` becomes row ``old_pos[u]``, plus the
    pairs ``(add_rows, add_items)`` (int64 [m] each); rows sorted, pairs distinct."""
    from svdfill.data.csr import build_csr

    if csr is None:
        rows, cols = add_rows, add_items
    else:
        indptr, indices = csr
        counts = indptr[1:] - indptr[:-1]
        rows = torch.cat([torch.repeat_interleave(old_pos, counts), add_rows])
        cols = torch.cat([indices.to(torch.int64), add_items])
    return build_csr(rows, cols, n2, n_items=n_items)


def write_foldin_run(out: str | os.PathLike, result: FoldIn, model: Any, *,
                     overwrite: bool = False) -> Path:
    """Write ``out/`` as a run directory the fill reads: ``seen.pt``, ``model.pt`` (the run's
    config; metrics = the old ones plus ``foldin``), ``config.toml`` and, last,
    ``summary.json`` with the fold-in counts. Each file atomically. Refuses the source run
    directory itself and a folder holding a model unless ``overwrite``."""
    from svdfill import checkpoint as ck

    out = Path(out)
    src_dir = model.path.parent.resolve()
    if out.exists() and out.resolve() == src_dir:
        raise UserError(f"{out}: is the source run; write the folded model to a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / ck.MODEL_FILE).exists() and not overwrite:
        raise UserError(f"{out}: already holds a model (add --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    # summary last: its presence says the directory is complete, as for a training run
    (out / ck.SUMMARY_FILE).unlink(missing_ok=True)
    ck.save_seen(out, result.seen["train"], result.seen["all"])
    metrics = {**model.metrics, "foldin": dict(result.info)}
    ck.save_model(out, result.state, result.idmap, model.config, metrics)
    ck.save_config_echo(out, model.config)
    ck.save_json(out / ck.SUMMARY_FILE, {"foldin": {**result.info, "model": str(model.path.resolve())},
                                         "source_metrics": model.metrics})
    return out
