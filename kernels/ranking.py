"""Ranking quality of top-k lists against held-out ratings: Precision@k, Recall@k, NDCG@k.

An item is *relevant* to a user when the user's held-out rating is >= ``threshold``
(default 4, "liked" on a 1-5 scale). Metrics are computed per user and averaged over the
users with at least one relevant held-out item (users with none have an undefined recall
and NDCG and are left out, as usual):

- precision@k = hits / k
- recall@k    = hits / |relevant|
- NDCG@k      = Σ_{r: hit} 1/log2(r+1) / Σ_{r=1..min(k, |relevant|)} 1/log2(r+1)

All vectorized: hits come from one ``searchsorted`` of (user, item) keys, no Python per user.
"""

from __future__ import annotations

import torch

from svdfill.kernels.fill import fill_topk

Tensor = torch.Tensor


def ranking_metrics(topk_items: Tensor, users: Tensor, heldout_users: Tensor, heldout_items: Tensor,
                    heldout_ratings: Tensor, *, k: int | None = None, threshold: float = 4.0) -> dict:
    """Precision/recall/NDCG@k of top-k lists.

    Args:
        topk_items: int64 [n, K] item ids per list, best first (−1 = padding, never a hit).
        users: int64 [n] the user of each list (distinct).
        heldout_users, heldout_items: int [m] held-out pairs; heldout_ratings float [m].
        k: cut-off (default K; at most K).
        threshold: a held-out rating >= threshold is relevant.

    Returns ``{"precision": float, "recall": float, "ndcg": float, "users": int, "k": int}``
    averaged over the listed users that have >= 1 relevant held-out item.
    """
    k = topk_items.shape[1] if k is None else int(k)
    if not 1 <= k <= topk_items.shape[1]:
        raise ValueError(f"k={k} outside 1..{topk_items.shape[1]}")
    dev = topk_items.device
    items = topk_items[:, :k].to(torch.int64)
    users = users.to(dev, torch.int64)
    rel = heldout_ratings.to(dev) >= threshold
    ru = heldout_users.to(dev, torch.int64)[rel]
    ri = heldout_items.to(dev, torch.int64)[rel]
    n_items_key = int(max(int(ri.max()) if ri.numel() else 0, int(items.max()) if items.numel() else 0)) + 1
    rel_keys = torch.unique(ru * n_items_key + ri)  # sorted, duplicates collapsed
    # relevant count per listed user
    rel_users = rel_keys // n_items_key
    lo = torch.searchsorted(rel_users, users)
    hi = torch.searchsorted(rel_users, users, right=True)
    n_rel = hi - lo
    keys = users[:, None] * n_items_key + items.clamp(min=0)
    pos = torch.searchsorted(rel_keys, keys).clamp(max=max(rel_keys.numel() - 1, 0))
    hit = (rel_keys[pos] == keys) & (items >= 0) if rel_keys.numel() else torch.zeros_like(items, dtype=torch.bool)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, device=dev, dtype=torch.float64))
    dcg = (hit.double() * discount).sum(1)
    ideal = torch.cumsum(discount, 0)[(n_rel.clamp(min=1, max=k) - 1)]
    ok = n_rel > 0
    n_ok = int(ok.sum())
    if n_ok == 0:
        return {"precision": float("nan"), "recall": float("nan"), "ndcg": float("nan"), "users": 0, "k": k}
    hits = hit.sum(1).double()
    return {
        "precision": float((hits[ok] / k).mean()),
        "recall": float((hits[ok] / n_rel[ok].double()).mean()),
        "ndcg": float((dcg[ok] / ideal[ok]).mean()),
        "users": n_ok,
        "k": k,
    }


def evaluate_topk(state: dict, heldout_users: Tensor, heldout_items: Tensor, heldout_ratings: Tensor,
                  k: int, *, seen=None, threshold: float = 4.0, device=None, dtype=None,
                  memory_budget: int | None = None) -> dict:
    """Fill the top-k of every user with a relevant held-out item and score it.

    state: the five model tensors; heldout_*: held-out pairs in contiguous ids (pairs with
    an unknown user or item, id −1, are dropped); seen: CSR of items to exclude (the
    training pairs), or None. Returns :func:`ranking_metrics`' dict.
    """
    device = torch.device(device) if device is not None else state["user_factors"].device
    known = (heldout_users >= 0) & (heldout_items >= 0)
    hu, hi_, hr = heldout_users[known].to(torch.int64), heldout_items[known].to(torch.int64), heldout_ratings[known]
    users = torch.unique(hu[hr >= threshold])
    n_items = state["item_factors"].shape[0]
    kk = min(k, n_items)
    if users.numel() == 0:
        return {"precision": float("nan"), "recall": float("nan"), "ndcg": float("nan"), "users": 0, "k": kk}
    P = state["user_factors"].to(device).index_select(0, users.to(device))
    bu = state["user_bias"].to(device).index_select(0, users.to(device))
    sub = None
    if seen is not None:
        from svdfill.kernels.topk import csr_take

        sub = csr_take(seen[0].to("cpu", torch.int64), seen[1].to("cpu"), users.cpu())
    _, items = fill_topk(P, state["item_factors"].to(device), bu, state["item_bias"].to(device),
                         float(state["global_mean"]), kk, sub, dtype=dtype, memory_budget=memory_budget)
    return ranking_metrics(items, users.to(device), hu, hi_, hr, threshold=threshold)


def ranking_for_model(model, raw, k: int, *, seen=None, threshold: float = 4.0, device=None,
                      dtype=None) -> dict:
    """``svdfill eval --topk K``: ranking metrics of a loaded model on held-out raw ratings.

    model: a :class:`svdfill.checkpoint.LoadedModel` (``state`` and ``idmap``); raw: held-out
    ratings with raw ``users``, ``items`` and ``ratings`` arrays; seen: CSR of the training
    pairs to exclude from the lists (``load_seen(run)["train"]``) or None. Pairs with a user
    or item unknown to the model cannot be recommended and are dropped. Returns
    ``{"precision@K", "recall@K", "ndcg@K", "ranking_users", "relevant_threshold"}``.
    """
    import numpy as np

    if k < 1:
        raise ValueError(f"--topk must be at least 1, got {k}")
    hu = torch.from_numpy(np.asarray(model.idmap.encode_users(raw.users), dtype=np.int64))
    hi = torch.from_numpy(np.asarray(model.idmap.encode_items(raw.items), dtype=np.int64))
    hr = torch.as_tensor(np.asarray(raw.ratings), dtype=torch.float32)
    m = evaluate_topk(model.state, hu, hi, hr, k, seen=seen, threshold=threshold, device=device, dtype=dtype)
    kk = m["k"]
    return {f"precision@{kk}": m["precision"], f"recall@{kk}": m["recall"], f"ndcg@{kk}": m["ndcg"],
            "ranking_users": m["users"], "relevant_threshold": threshold}
