"""The fill across Ray actors: each actor holds one contiguous item shard.

Actor ``r`` keeps its shard's item factors and biases (on its GPU when it has one), the user
factors and biases, and the seen pairs that fall in its shard. For each user block the driver
asks every actor for the top-k over its shard (global item ids through ``item_offset``) and
merges the W lists with :func:`svdfill.kernels.fill.merge_topk` — the same exact top-k as one
process (ties → lower item id). Blocks are pipelined: the next blocks are already computing
while the driver merges and writes the current one.

Large arrays travel once, through the object store (``ray.put``), not once per block.
"""

from __future__ import annotations

import numpy as np
import torch

from svdfill.distributed.sharding import even_shards


def csr_restrict(indptr: np.ndarray, indices: np.ndarray, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries in ``[lo, hi)`` made local (``id - lo``): ``(indptr int64 [U+1],
    indices int64 [nnz'])`` as CPU tensors, row order kept."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices)
    keep = (indices >= lo) & (indices < hi)
    row = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    counts = np.bincount(row[keep], minlength=indptr.size - 1)
    out_ptr = np.zeros(indptr.size, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    return torch.from_numpy(out_ptr), torch.from_numpy(indices[keep].astype(np.int64) - lo)


class FillShard:
    """One item shard of the fill (wrapped with ``ray.remote`` by :func:`start_actors`)."""

    def __init__(self, shard: tuple[int, int], item_factors: np.ndarray, item_bias: np.ndarray,
                 user_factors: np.ndarray, user_bias: np.ndarray, global_mean: float,
                 seen: tuple[np.ndarray, np.ndarray] | None, dtype: str | None,
                 memory_budget: int | None):
        self.lo, self.hi = shard
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = self.device
        # Object-store arrays are read-only views; torch wants writable memory.
        self.q = torch.from_numpy(np.array(item_factors[self.lo:self.hi], dtype=np.float32)).to(dev)
        self.bi = torch.from_numpy(np.array(item_bias[self.lo:self.hi], dtype=np.float32)).to(dev)
        self.p = torch.from_numpy(np.array(user_factors, dtype=np.float32)).to(dev)
        self.bu = torch.from_numpy(np.array(user_bias, dtype=np.float32)).to(dev)
        self.mu = float(global_mean)
        self.seen = None if seen is None else csr_restrict(seen[0], seen[1], self.lo, self.hi)
        from svdfill.kernels.fill import device_dtype

        # the driver leaves the choice to the actors (their devices, not its own)
        self.dtype = device_dtype(dtype, dev)
        self.memory_budget = memory_budget

    def where(self) -> dict:
        """Node, process and device of this actor (for logs and the multi-node test)."""
        import os

        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "dtype": self.dtype or "float32",
                "shard": (self.lo, self.hi), "ip": ray.util.get_node_ip_address()}

    def topk(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over this shard for ``users`` (int64 [B]): scores float32 [B, k],
        global item ids int64 [B, k] (−1 / −inf where the shard has fewer than k unseen)."""
        from svdfill.kernels.fill import csr_take, fill_topk

        cpu_rows = torch.from_numpy(np.array(users, dtype=np.int64))
        rows = cpu_rows.to(self.device)
        seen = None if self.seen is None else csr_take(self.seen[0], self.seen[1], cpu_rows)
        s, i = fill_topk(self.p[rows], self.q, self.bu[rows], self.bi, self.mu, k, seen,
                         item_offset=self.lo, dtype=self.dtype, memory_budget=self.memory_budget)
        return s.cpu().numpy(), i.cpu().numpy()


def start_actors(state: dict[str, torch.Tensor], seen: tuple[torch.Tensor, torch.Tensor] | None,
                 num_actors: int, *, use_gpu: bool = False, dtype: str | None = None,
                 memory_budget: int | None = None, spread: bool = True,
                 num_cpus: float = 1.0) -> tuple[list, list[tuple[int, int]]]:
    """Start ``num_actors`` :class:`FillShard` actors over equal contiguous item shards.

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
    Remote = ray.remote(FillShard)
    mu = float(state["global_mean"])
    actors = [Remote.options(**opts).remote(sh, q_ref, bi_ref, p_ref, bu_ref, mu, seen_ref,
                                            dtype, memory_budget)
              for sh in shards]
    ray.get([a.where.remote() for a in actors])  # surface construction errors here
    return actors, shards


class ShardedBlockTopk:
    """``fn(b) -> (scores float32 [B, k], items int64 [B, k])`` for user block ``b``: every
    actor's shard top-k merged with :func:`svdfill.kernels.fill.merge_topk` on
    ``merge_device``.

    Blocks are expected in increasing order (the export's order); up to ``depth`` blocks
    ahead are already submitted to the actors, so they compute while the caller writes.
    ``rows_of(b)``: the users (int64 [B]) of block ``b``; ``n_blocks``: how many there are.
    """

    def __init__(self, actors: list, rows_of, n_blocks: int, k: int, *, depth: int = 2,
                 merge_device: torch.device | None = None):
        self.actors, self.rows_of, self.n_blocks, self.k = actors, rows_of, n_blocks, k
        self.depth = max(1, depth)
        self.merge_device = merge_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pending: dict[int, list] = {}

    def _submit(self, b: int) -> None:
        import ray

        if b in self.pending or b >= self.n_blocks:
            return
        rows = np.asarray(torch.as_tensor(self.rows_of(b)).cpu().numpy(), dtype=np.int64)
        ref = ray.put(rows)
        self.pending[b] = [a.topk.remote(ref, self.k) for a in self.actors]

    def __call__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        import ray

        from svdfill.kernels.fill import merge_topk

        for ahead in range(b, b + self.depth):
            self._submit(ahead)
        for old in [x for x in self.pending if x < b]:  # skipped blocks (resume): drop
            del self.pending[old]
        parts = ray.get(self.pending.pop(b))
        self._submit(b + self.depth)
        dev = self.merge_device
        lists = [(torch.from_numpy(np.array(s)).to(dev), torch.from_numpy(np.array(i)).to(dev))
                 for s, i in parts]
        return merge_topk(lists, self.k)


def ray_sharded(num_actors: int, *, use_gpu: bool = False, depth: int = 2, spread: bool = True,
                on_start=None):
    """The ``sharded`` hook of :func:`svdfill.launch.cmd_fill.main` for Ray: start the actors
    on the model, then hand the export a :class:`ShardedBlockTopk` over them.
    ``on_start(actors, shards)`` is called once they are up (for logs)."""

    def sharded(state, seen, k, device, dtype, memory_budget):
        actors, shards = start_actors(state, seen, num_actors, use_gpu=use_gpu, dtype=dtype,
                                      memory_budget=memory_budget, spread=spread)
        if on_start is not None:
            on_start(actors, shards)

        def factory(rows_of, n_blocks):
            return ShardedBlockTopk(actors, rows_of, n_blocks, k, depth=depth,
                                    merge_device=torch.device(device))
        return factory

    sharded.computes_here = False  # the actors pick their compute dtype for their devices
    return sharded
