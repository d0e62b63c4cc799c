"""The Ray side of the sharded fill: one actor per contiguous item shard.

Actor ``r`` (:class:`ShardActor`) builds a :class:`svdfill.fill.shard.ItemShard` (on its
GPU when it has one) from arrays it receives through the object store — sent once
(``ray.put``) by :func:`start_actors`, not once per block — and answers per-block top-k
requests with numpy arrays. :class:`svdfill.distributed.sharded_fill.RayFill` drives the
actors block by block and merges their lists into one file — or, for a partitioned export
(``--out DIR/``), has every actor write its own part (:meth:`ShardActor.write_part`) while the
driver only checks the folder and writes the manifest last.
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
        self.state, self.seen, self.k = state, seen, k  # for write_part's plan (views, no copies)

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


    def write_part(self, part: int, parts: int, out: str, idmap, plan_kwargs: dict,
                   peers: list, depth: int = 2) -> dict:
        """Write part ``part`` of ``parts`` of the dataset folder ``out`` (on storage this
        actor's node sees): the blocks :func:`svdfill.fill.dataset.export_dataset` gives that
        rank, each merged from this actor's shard and the lists of ``peers`` (every actor's
        handle, this one's at index ``part``: the actor runs with ``max_concurrency`` 2, so it
        serves the others' requests while it writes). ``plan_kwargs``: :func:`plan_fill`'s
        (users, dtype, memory_budget, user_block, provenance), as the driver planned it.
        Returns the manifest entry of the part (:func:`svdfill.fill.part_writer.write_part`)."""
        import warnings

        import ray

        from svdfill.fill.export import plan_fill
        from svdfill.fill.part_writer import write_part
        from svdfill.kernels.fill import merge_topk

        with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            state = {key: torch.as_tensor(v) for key, v in self.state.items()}
            seen = None if self.seen is None else tuple(torch.as_tensor(x) for x in self.seen)
        plan = plan_fill(state, idmap, k=self.k, seen=seen, device="cpu", **plan_kwargs)
        # a whole shard (replicated items) needs no one else's lists
        others = [] if self.shard.whole else [a for j, a in enumerate(peers) if j != part]
        pending: dict[int, list] = {}

        def request(b: int) -> None:
            if b not in pending:
                rows = np.asarray(plan.rows_of(b).numpy(), dtype=np.int64)
                pending[b] = [a.topk.remote(rows) for a in others]

        def table_of(b: int):
            rows = plan.rows_of(b)
            if not others:  # every item is here
                s, i = self.shard.topk(rows)
                return plan.table(rows, s.cpu(), i.cpu())
            request(b)
            for stale in [x for x in pending if x < b]:
                del pending[stale]
            for nxt in range(b + 1, b + depth):
                if nxt < plan.n_blocks:
                    request(nxt)
            s, i = self.shard.topk(rows)
            lists = [(s.cpu(), i.cpu())] + [(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))
                                            for x, y in ray.get(pending.pop(b))]
            return plan.table(rows, *merge_topk(lists, self.k))

        info = write_part(plan, out, part, parts, table_of)
        info["writer"] = f"ray actor pid {self.where()['pid']} on {self.where()['ip']}"
        return info


def start_actors(state: dict[str, torch.Tensor], seen: tuple[torch.Tensor, torch.Tensor] | None,
                 num_actors: int, *, k: int, use_gpu: bool = False, dtype: str | None = None,
                 memory_budget: int | None = None, spread: bool = True,
                 num_cpus: float = 1.0,
                 shards: list[tuple[int, int]] | None = None) -> tuple[list, list[tuple[int, int]]]:
    """Start ``num_actors`` :class:`ShardActor` actors over equal contiguous item shards (or
    the given ``shards``, one per actor: all ``(0, n_items)`` replicates the items), for
    top-``k`` requests.

    ``state``: the five model tensors (``user_factors [U, d]``, ``item_factors [I, d]``,
    ``user_bias [U]``, ``item_bias [I]``, ``global_mean`` 0-d). ``spread`` asks Ray to place
    the actors on different nodes where it can. Returns ``(actors, shards)``; the actors are
    ready (their state is loaded) when this returns.
    """
    import ray

    n_items = int(state["item_factors"].shape[0])
    shards = even_shards(n_items, num_actors) if shards is None else list(shards)
    if len(shards) != num_actors:
        raise ValueError(f"{len(shards)} shards for {num_actors} actors")
    to_np = lambda t: t.detach().cpu().contiguous().numpy()  # noqa: E731
    q_ref, bi_ref = ray.put(to_np(state["item_factors"])), ray.put(to_np(state["item_bias"]))
    p_ref, bu_ref = ray.put(to_np(state["user_factors"])), ray.put(to_np(state["user_bias"]))
    seen_ref = None if seen is None else ray.put((to_np(seen[0]).astype(np.int64), to_np(seen[1])))
    # 2 threads: an actor writing its own part still answers the other writers' requests
    opts = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0, "max_concurrency": 2}
    if spread:
        opts["scheduling_strategy"] = "SPREAD"
    Remote = ray.remote(ShardActor)
    mu = float(state["global_mean"])
    actors = [Remote.options(**opts).remote(sh, q_ref, bi_ref, p_ref, bu_ref, mu, seen_ref,
                                            k, dtype, memory_budget)
              for sh in shards]
    ray.get([a.where.remote() for a in actors])  # surface construction errors here
    return actors, shards
