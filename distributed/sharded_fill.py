"""The sharded fill: item shards held by other processes, one merged top-k per user block.

W processes each hold one contiguous item shard of the model as a
:class:`svdfill.fill.shard.ItemShard` (equal shards, :func:`even_shards`). The export
(:func:`svdfill.fill.export.export_fill`, which still writes the one Parquet file here) walks
the user blocks in order; for each block every shard computes its top-k with global item ids,
and the W lists are merged with :func:`svdfill.kernels.fill.merge_topk` — exactly the
one-process fill (ties → lower item id), whatever W is.

:class:`ShardedFill` is that protocol, written once. A transport says how a block reaches
the shards and how their lists come back:

- ``start(state, seen, k=, device=, dtype=, memory_budget=)``: put the shards in place
  (called once by ``svdfill fill`` after it has resolved the settings);
- ``submit(rows) -> handle``: start computing one block (users int64 [B], CPU);
- ``collect(handle) -> [(scores [B, k], items [B, k]), …]``: the W shard lists of it;
- ``close()``: release the shards (after the last block, or after an early error).

The base's :meth:`ShardedFill.blocks` (what the export calls, the ``ShardedTopk`` protocol of
:mod:`svdfill.fill.export`) submits up to ``ahead`` blocks beyond the one it waits for, so
shards compute while the export merges and writes, and merges on ``merge_device``.
``shards_pick_dtype`` says whether each shard chooses its compute dtype for its own device
(the command line then leaves the configured dtype alone).

Transports:

- :class:`TorchrunFill` (rank 0 of a torch.distributed group): rank 0 broadcasts each
  block's users to the ranks (:meth:`DistWorld.broadcast_object`), computes shard 0 itself
  and gathers the other ranks' lists (:func:`svdfill.distributed.gather.gather_lists`);
  ranks > 0 run :func:`serve_torchrun`. Collectives pair up in order, so nothing is
  submitted ahead (``ahead = 0``).
- :class:`RayFill`: W Ray actors (:class:`svdfill.distributed.ray_fill.ShardActor`), the
  model shipped once through the object store; ``ahead = 2`` blocks are queued on the actors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from svdfill.distributed.sharding import even_shards

Tensor = torch.Tensor
TopkList = tuple[Tensor, Tensor]


class ShardedFill:
    """Base of the sharded-fill transports (see the module docstring).

    Subclasses implement :meth:`start`, :meth:`submit`, :meth:`collect` and may override
    :meth:`close`; they set ``k`` and ``merge_device`` in :meth:`start`.
    """

    shards_pick_dtype: bool = False
    """True: each shard holder picks its compute dtype for its own device (Ray actors)."""
    ahead: int = 0
    """Blocks submitted beyond the one being waited for."""
    k: int = 0
    merge_device: torch.device = torch.device("cpu")

    def start(self, state: dict, seen, *, k: int, device: torch.device, dtype: str | None,
              memory_budget: int | None) -> None:
        raise NotImplementedError

    def submit(self, rows: Tensor) -> Any:
        raise NotImplementedError

    def collect(self, handle: Any) -> list[TopkList]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the shards; safe to call when :meth:`start` never ran."""

    def blocks(self, rows_of: Callable[[int], Any], n_blocks: int) -> "BlockPipeline":
        """The block top-k function for the export: ``fn(b) -> (scores float32 [B, k],
        items int64 [B, k])`` for blocks asked in increasing order; ``rows_of(b)``: the
        users (int64 [B]) of block ``b``."""
        return BlockPipeline(self, rows_of, n_blocks)


class BlockPipeline:
    """Walks the blocks of one export over a :class:`ShardedFill` (see
    :meth:`ShardedFill.blocks`): blocks ``b .. b + ahead`` are submitted before block ``b``
    is collected and merged; blocks skipped over (a resumed export) are dropped."""

    def __init__(self, fill: ShardedFill, rows_of: Callable[[int], Any], n_blocks: int):
        self.fill, self.rows_of, self.n_blocks = fill, rows_of, n_blocks
        self.pending: dict[int, Any] = {}

    def _submit(self, b: int) -> None:
        if b in self.pending or b >= self.n_blocks:
            return
        rows = torch.as_tensor(self.rows_of(b)).to(torch.int64).cpu()
        self.pending[b] = self.fill.submit(rows)

    def __call__(self, b: int) -> TopkList:
        from svdfill.kernels.fill import merge_topk

        for old in [x for x in self.pending if x < b]:
            del self.pending[old]
        for ahead in range(b, b + 1 + max(0, self.fill.ahead)):
            self._submit(ahead)
        parts = self.fill.collect(self.pending.pop(b))
        if len(parts) == 1:  # one list over every item (W = 1, or replicated): already ordered
            return parts[0]
        dev = self.fill.merge_device
        return merge_topk([(s.to(dev), i.to(dev)) for s, i in parts], self.fill.k)


# -- torchrun (torch.distributed) -------------------------------------------------------------

class TorchrunFill(ShardedFill):
    """Rank 0's side of the fill over a torch.distributed group: shard r on rank r.

    ``world``: rank 0's :class:`svdfill.distributed.world.DistWorld`. The other ranks run
    :func:`serve_torchrun` until :meth:`close` releases them; call :meth:`close` in all
    cases (before :meth:`start` it tells them there is nothing to do).
    """

    def __init__(self, world):
        self.world = world
        self.merge_device = world.comm_device
        self.started = False
        self.shard = None

    def start(self, state, seen, *, k, device, dtype, memory_budget) -> None:
        from svdfill.fill.shard import ItemShard

        self.world.broadcast_object({"cmd": "start", "k": k, "dtype": dtype, "budget": memory_budget,
                                     "exclude": seen is not None})
        self.started = True
        self.k = k
        shards = even_shards(int(state["item_factors"].shape[0]), self.world.world_size)
        self.shard = ItemShard(state, shards[0], k=k, seen=seen, device=self.world.device,
                               dtype=dtype, memory_budget=memory_budget)

    def submit(self, rows: Tensor) -> TopkList:
        self.world.broadcast_object({"cmd": "block", "rows": rows})
        return self.shard.topk(rows)

    def collect(self, handle: TopkList) -> list[TopkList]:
        from svdfill.distributed.gather import gather_lists

        w = self.world
        return gather_lists(handle[0], handle[1], w.world_size, w.rank, w.comm_device)

    def close(self) -> None:
        self.world.broadcast_object({"cmd": "stop"} if self.started else None)


def serve_torchrun(world, load: Callable[[bool], tuple[dict, Any]]) -> None:
    """Ranks > 0 of :class:`TorchrunFill`: wait for rank 0's start, build this rank's
    :class:`ItemShard`, answer blocks until rank 0 says stop. ``load(exclude_seen)`` returns
    ``(state, seen CSR or None)`` of the model rank 0 fills."""
    from svdfill.distributed.gather import gather_lists
    from svdfill.fill.shard import ItemShard

    msg = world.broadcast_object(None)
    if msg is None or msg["cmd"] != "start":
        return
    state, seen = load(msg["exclude"])
    shards = even_shards(int(state["item_factors"].shape[0]), world.world_size)
    shard = ItemShard(state, shards[world.rank], k=msg["k"], seen=seen, device=world.device,
                      dtype=msg["dtype"], memory_budget=msg["budget"])
    while True:
        msg = world.broadcast_object(None)
        if msg is None or msg["cmd"] != "block":
            return
        s, i = shard.topk(msg["rows"])
        gather_lists(s, i, world.world_size, world.rank, world.comm_device)


# -- Ray actors -----------------------------------------------------------------------------

class RayFill(ShardedFill):
    """The fill over ``num_actors`` Ray actors, one item shard each (started by :meth:`start`
    with :func:`svdfill.distributed.ray_fill.start_actors`; Ray must be initialized).

    ``item_split`` (:func:`svdfill.distributed.sharding.fill_item_shards`; "shard" by
    default): with the items replicated, each block goes to one actor in turn and comes back
    whole (no merge of W lists), and in a partitioned export each actor fills its own part
    without asking the others.

    ``depth``: blocks queued on the actors ahead of the one being merged. ``on_start(actors,
    shards)`` is called once they are up (for logs). The actors pick their compute dtype
    for their own devices. :meth:`from_actors` wraps actors that are already running.
    """

    shards_pick_dtype = True

    def __init__(self, num_actors: int, *, use_gpu: bool = False, depth: int = 2,
                 spread: bool = True, num_cpus: float = 1.0, on_start=None,
                 item_split: str = "shard"):
        self.num_actors, self.use_gpu, self.spread, self.num_cpus = num_actors, use_gpu, spread, num_cpus
        self.ahead = max(1, depth)
        self.on_start = on_start
        self.item_split = item_split
        self.replicated = False
        self.actors: list = []
        self.shards: list[tuple[int, int]] = []
        self._turn = 0

    @classmethod
    def from_actors(cls, actors: list, k: int, *, depth: int = 2,
                    merge_device: torch.device | None = None) -> "RayFill":
        """Over running :class:`ShardActor` actors (started for top-``k``)."""
        self = cls(len(actors), depth=depth)
        self.actors, self.k = list(actors), k
        self.merge_device = merge_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self

    def start(self, state, seen, *, k, device, dtype, memory_budget) -> None:
        from svdfill.distributed.ray_fill import start_actors
        from svdfill.distributed.sharding import fill_item_shards, is_replicated

        n_items, d = state["item_factors"].shape
        shards = fill_item_shards(int(n_items), int(d), self.num_actors, self.item_split)
        self.replicated = is_replicated(shards, int(n_items)) and self.num_actors > 1
        if self.replicated:  # blocks go round the actors: keep each of them busy
            self.ahead = max(self.ahead, 2 * self.num_actors - 1)
        self.actors, self.shards = start_actors(state, seen, self.num_actors, k=k, use_gpu=self.use_gpu,
                                                dtype=dtype, memory_budget=memory_budget,
                                                spread=self.spread, num_cpus=self.num_cpus,
                                                shards=shards)
        self.k, self.merge_device = k, torch.device(device)
        if self.on_start is not None:
            self.on_start(self.actors, self.shards)

    def submit(self, rows: Tensor) -> list:
        import ray

        ref = ray.put(np.asarray(rows.numpy(), dtype=np.int64))
        if self.replicated:  # any actor has every item: one answers the whole block
            actor = self.actors[self._turn % len(self.actors)]
            self._turn += 1
            return [actor.topk.remote(ref)]
        return [a.topk.remote(ref) for a in self.actors]

    def collect(self, handle: list) -> list[TopkList]:
        import ray

        # object-store arrays are read-only views: copied for torch
        return [(torch.from_numpy(np.array(s)), torch.from_numpy(np.array(i))) for s, i in ray.get(handle)]

    def export_parts(self, state: dict, idmap, out, *, k: int, seen=None, users=None,
                     full: bool = False, device=None, dtype: str | None = None,
                     memory_budget: int | None = None, user_block: int | None = None,
                     restart: bool = False, quiet: bool = False, provenance: dict | None = None,
                     **_ignored) -> dict:
        """The partitioned export (``--out DIR/``) with every actor writing its own part
        (:meth:`svdfill.distributed.ray_fill.ShardActor.write_part`): part r = actor r's, the
        blocks :func:`svdfill.fill.dataset.export_dataset` gives rank r of W, so the folder
        equals a torchrun export at W = ``num_actors``. The driver checks the folder (and
        ``restart``s it), waits for the parts and writes ``_manifest.json`` last. Arguments and
        summary as :func:`export_dataset`; top-k only; call after :meth:`start`."""
        import time

        import ray
        from tqdm import tqdm

        from svdfill.data.export import ExportError
        from svdfill.fill import dataset as D
        from svdfill.fill.export import plan_fill

        if full:
            raise ValueError("a dense fill (full) is written by one process")
        t0 = time.perf_counter()
        shown, out = str(out), Path(out)
        W = len(self.actors)
        kw = {"users": users, "dtype": dtype, "memory_budget": memory_budget,
              "user_block": user_block, "provenance": provenance}
        plan = plan_fill(state, idmap, k=k, seen=seen, device="cpu", **kw)
        D._check_folder(out, shown)
        out.mkdir(exist_ok=True)
        if restart:
            D._clear(out)
        else:
            D._check_writers(out, shown, W)
        (out / D.MANIFEST).unlink(missing_ok=True)  # no reader may pair it with new parts
        idmap_ref = ray.put(idmap)
        futures = [a.write_part.remote(r, W, str(out.resolve()), idmap_ref, kw, self.actors)
                   for r, a in enumerate(self.actors)]
        infos: dict = {}
        bar = tqdm(total=plan.n_blocks, unit="block", desc="fill parts", dynamic_ncols=True,
                   disable=quiet or not sys.stderr.isatty())
        try:
            left = list(futures)
            while left:
                ready, left = ray.wait(left, num_returns=1)
                try:
                    info = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if isinstance(cause, (ExportError, OSError)):
                        raise ExportError(f"{shown}: a part writer failed: {cause}") from None
                    raise
                infos[info["rank"]] = info
                bar.update(info["last_block"] - info["first_block"] + 1)
        finally:
            bar.close()
        for p in out.iterdir():  # parts of an earlier, larger dataset in this folder
            m = D._PART_RE.match(p.name)
            if m and int(m.group(1)) >= W:
                p.unlink()
        entries = [{key: v for key, v in infos[r].items() if key not in ("resumed_blocks", "seconds")}
                   for r in range(W)]
        D._write_manifest(out, plan, entries)
        return {"path": shown, "parts": W, "blocks": plan.n_blocks,
                "resumed_blocks": sum(i["resumed_blocks"] for i in infos.values()),
                "users": plan.n_sel, "rows_computed": sum(i["rows"] for i in infos.values()),
                "seconds": time.perf_counter() - t0, "user_block": plan.block,
                "writers": [infos[r]["writer"] for r in range(W)]}


# -- a partitioned export written by every rank -----------------------------------------------

class TorchrunExchange:
    """One rank of a partitioned fill export over a torch.distributed group (the
    :class:`svdfill.fill.dataset.BlockExchange` of :func:`svdfill.fill.dataset.export_dataset`):
    shard r on rank r; every rank walks every block, and each block's W shard lists are
    gathered to the rank that owns (writes) the block, not to rank 0. No block's users are
    broadcast: every rank knows the block list. ``item_split``
    (:func:`svdfill.distributed.sharding.fill_item_shards`): with the items replicated
    (``local``), each rank computes only its own blocks over every item, with no collective
    per block."""

    def __init__(self, world, item_split: str = "shard"):
        self.world = world
        self.rank, self.size = world.rank, world.world_size
        self.item_split = item_split
        self.shard = None
        self.k = 0
        self.local = False
        """True once started with the items replicated: each rank fills its own blocks alone."""

    def start(self, state, seen, *, k, device, dtype, memory_budget) -> None:
        from svdfill.distributed.sharding import fill_item_shards, is_replicated
        from svdfill.fill.shard import ItemShard

        self.k = k
        n_items, d = state["item_factors"].shape
        shards = fill_item_shards(int(n_items), int(d), self.size, self.item_split)
        self.local = is_replicated(shards, int(n_items))
        self.shard = ItemShard(state, shards[self.rank], k=k, seen=seen, device=self.world.device,
                               dtype=dtype, memory_budget=memory_budget)

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def topk(self, rows: Tensor, owner: int) -> TopkList | None:
        from svdfill.distributed.gather import gather_lists
        from svdfill.kernels.fill import merge_topk

        if self.local:  # the whole catalogue is here: no collective, only the owner asks
            return self.shard.topk(rows) if owner == self.rank else None
        s, i = self.shard.topk(rows)
        w = self.world
        parts = gather_lists(s, i, w.world_size, w.rank, w.comm_device, dst=owner)
        return None if parts is None else merge_topk(parts, self.k)
