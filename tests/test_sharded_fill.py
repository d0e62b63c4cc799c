"""distributed.sharded_fill: the block walk every transport shares (submit ahead, collect,
merge, skip on resume) on an in-process transport, and the torchrun transport over a real
W=2 gloo group (tests/multiprocess_harness.py) writing the file the one-process export
writes, byte for byte. The Ray transport end to end: tests/test_ray_job.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multiprocess_harness import run_ranks
from reference import assert_topk_exact
from svdfill.distributed.sharded_fill import ShardedFill
from svdfill.fill.shard import ItemShard
from test_shard import I, U, dyadic_state, oracle, seen_csr


class LocalFill(ShardedFill):
    """A transport whose 'shards' live in this process; records what it is asked."""

    def __init__(self, shards, ahead: int, block: int = 5):
        self.shards, self.ahead, self.block, self.log = shards, ahead, block, []

    def start(self, state, seen, *, k, device, dtype, memory_budget):
        self.k, self.merge_device = k, torch.device(device)
        self.items = [ItemShard(state, sh, k=k, seen=seen, device=device, dtype=dtype,
                                memory_budget=memory_budget) for sh in self.shards]

    def submit(self, rows):
        self.log.append(("submit", int(rows[0]) // self.block))
        return rows

    def collect(self, rows):
        self.log.append(("collect", int(rows[0]) // self.block))
        return [sh.topk(rows) for sh in self.items]


def _blocks(n=U, size=5):
    return [torch.arange(lo, min(lo + size, n)) for lo in range(0, n, size)]


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_blocks_submit_ahead_then_collect_in_order(ahead):
    st, seen = dyadic_state(), seen_csr()
    f = LocalFill([(0, 4), (4, 15), (15, I)], ahead)
    f.start(st, seen, k=6, device="cpu", dtype=None, memory_budget=None)
    blocks = _blocks()
    fn = f.blocks(lambda b: blocks[b], len(blocks))
    for b, rows in enumerate(blocks):
        assert_topk_exact(fn(b), oracle(st, rows, 6, seen))
    n = len(blocks)
    # every block submitted once, in order, before it is collected; never past the last
    subs = [x for what, x in f.log if what == "submit"]
    assert subs == list(range(n))
    for b in range(n):
        at = f.log.index(("collect", b))
        submitted = {x for what, x in f.log[:at] if what == "submit"}
        assert submitted == set(range(min(b + ahead, n - 1) + 1))


def test_a_resumed_walk_starts_at_its_first_block_and_drops_skipped_ones():
    st = dyadic_state()
    f = LocalFill([(0, 10), (10, I)], ahead=2)
    f.start(st, None, k=3, device="cpu", dtype=None, memory_budget=None)
    blocks = _blocks()
    fn = f.blocks(lambda b: blocks[b], len(blocks))
    fn(3)
    assert f.log == [("submit", 3), ("submit", 4), ("submit", 5), ("collect", 3)]
    fn(5)  # block 4 was skipped: dropped, never collected
    assert ("collect", 4) not in f.log and f.log[-1] == ("collect", 5)
    assert 4 not in fn.pending


def test_the_hook_is_a_typed_object():
    from svdfill.distributed.sharded_fill import RayFill, TorchrunFill

    assert RayFill(2).shards_pick_dtype and RayFill(2, depth=3).ahead == 3
    assert not TorchrunFill.shards_pick_dtype and TorchrunFill.ahead == 0


# -- torchrun transport over a real gloo group ------------------------------------------------

def _export_w(rank: int, world_size: int, out: str, early_error: bool) -> bool:
    from svdfill.data.idmap import IdMap
    from svdfill.distributed.sharded_fill import TorchrunFill, serve_torchrun
    from svdfill.distributed.world import DistWorld
    from svdfill.fill.export import export_fill

    world = DistWorld(rank, world_size, torch.device("cpu"), "gloo")
    st, seen = dyadic_state(), seen_csr()
    if rank != 0:
        served = []

        def load(exclude):
            served.append(exclude)
            return st, (seen if exclude else None)
        serve_torchrun(world, load)
        return served == ([] if early_error else [True])
    sharded = TorchrunFill(world)
    try:
        if early_error:
            return True  # e.g. a bad option: close() before start() releases the ranks
        sharded.start(st, seen, k=6, device=torch.device("cpu"), dtype=None, memory_budget=None)
        export_fill(st, _idmap(IdMap), out, k=6, seen=seen, user_block=5, quiet=True, sharded=sharded)
        return True
    finally:
        sharded.close()


def _idmap(IdMap):
    return IdMap(1000 + 3 * np.arange(U), np.array([f"m{i:03d}" for i in range(I)], dtype=object))


@pytest.mark.multiprocess
def test_torchrun_transport_w2_writes_the_one_process_file(tmp_path):
    from svdfill.data.idmap import IdMap
    from svdfill.fill.export import export_fill

    ref = tmp_path / "one.parquet"
    export_fill(dyadic_state(), _idmap(IdMap), ref, k=6, seen=seen_csr(), user_block=5, quiet=True)
    got = tmp_path / "w2.parquet"
    assert run_ranks(_export_w, 2, str(got), False) == [True, True]
    assert got.read_bytes() == ref.read_bytes()
    assert run_ranks(_export_w, 2, str(tmp_path / "none.parquet"), True) == [True, True]
    assert not (tmp_path / "none.parquet").exists()
