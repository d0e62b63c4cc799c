"""The Ray side of the sharded fill: one actor per contiguous item shard.

Actor ``r`` (:class:`ShardActor`) builds a :class:`svdfill.fill.shard.ItemShard` (on its
GPU when it has one) from arrays it receives through the object store — sent once
(``ray.put``) by :func:`start_actors`, not once per block — and answers per-block top-k
requests with numpy arrays. :class:`svdfill.distributed.sharded_fill.RayFill` drives the
actors block by block and merges their lists.
"""

from __future__ import annotations

import numpy as np
import torch

from svdfill.distributed.sharding import even_shards


class ShardActor:
    """One item shard of the fill (wrapped with ``ray.remote`` by :func:`start_actors`).

    The arrays are the model's (numpy, possibly read-only object-store views); ``seen``
    the CSR ``(indptr, indices)`` of global item ids or None; ``dtype`` the configured
    compute dtype, which the actor adapts to its own device
    (:func:`svdfill.kernels.fill.device_dtype`).
    """

    def __init__(self, shard: tuple[int, int], item_factors: np.ndarray, item_bias: np.ndarray,
                 user_factors: np.ndarray, user_bias: np.ndarray, global_mean: float,
                 seen: tuple[np.ndarray, np.ndarray] | None, k: int, dtype: str | None,
                 memory_budget: int | None):
        from svdfill.fill.shard import ItemShard
        from svdfill.kernels.fill import device_dtype

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state = {"item_factors": item_factors, "item_bias": item_bias, "user_factors": user_factors,
                 "user_bias": user_bias, "global_mean": global_mean}
        # the driver leaves the choice to the actors (their devices, not its own)
        self.device = device
        self.shard = ItemShard(state, shard, k=k, seen=seen, device=device,
                               dtype=device_dtype(dtype, device), memory_budget=memory_budget)

    def where(self) -> dict:
        """Node, process and device of this actor (for logs and the multi-node test)."""
        import os

        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "dtype": self.shard.dtype or "float32",
                "shard": (self.shard.lo, self.shard.hi), "ip": ray.util.get_node_ip_address()}

    def topk(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`ItemShard.topk` for ``users`` (int64 [B]) as numpy: scores float32 [B, k],
        global item ids int64 [B, k]."""
        s, i = self.shard.topk(users)
        return s.cpu().numpy(), i.cpu().numpy()


def start_actors(state: dict[str, torch.Tensor], seen: tuple[torch.Tensor, torch.Tensor] | None,
                 num_actors: int, *, k: int, use_gpu: bool = False, dtype: str | None = None,
                 memory_budget: int | None = None, spread: bool = True,
                 num_cpus: float = 1.0) -> tuple[list, list[tuple[int, int]]]:
    """Start ``num_actors`` :class:`ShardActor` actors over equal contiguous item shards,
    for top-``k`` requests.

    ``state``: the five model tensors (``user_factors [U, d]``, ``item_factors [I, d]``,
    ``user_bias [U]``, ``item_bias [I]``, ``global_mean`` 0-d). ``spread`` asks Ray to place
    the actors on different nodes where it can. Returns ``(actors, shards)``; the actors are
    ready (their state is loaded) when this returns.
    """
    import ray

    n_items = int(state["item_factors"].shape[0])
    shards = even_shards(n_items, num_actors)
    to_np = lambda t: t.detach().cpu().contiguous().numpy()  # noqa: E731
    q_ref, bi_ref = ray.put(to_np(state["item_factors"])), ray.put(to_np(state["item_bias"]))
    p_ref, bu_ref = ray.put(to_np(state["user_factors"])), ray.put(to_np(state["user_bias"]))
    seen_ref = None if seen is None else ray.put((to_np(seen[0]).astype(np.int64), to_np(seen[1])))
    opts = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0}
    if spread:
        opts["scheduling_strategy"] = "SPREAD"
    Remote = ray.remote(ShardActor)
    mu = float(state["global_mean"])
    actors = [Remote.options(**opts).remote(sh, q_ref, bi_ref, p_ref, bu_ref, mu, seen_ref,
                                            k, dtype, memory_budget)
              for sh in shards]
    ray.get([a.where.remote() for a in actors])  # surface construction errors here
    return actors, shards
