"""distributed.ring: shifts of ragged shards (one empty) around a real gloo ring of W = 3,
W shifts bring every shard home, the byte counter counts exactly the payload, and W = 1 is
the identity. (W = 2, where both neighbours are one rank, is exercised exactly by
tests/test_dsgd.py and tests/test_grid_fill.py.)"""

from __future__ import annotations

import pytest
import torch

from multiprocess_harness import run_ranks
from svdfill.distributed.ring import Ring
from svdfill.distributed.world import DistWorld, World

SIZES = [3, 0, 5]  # rank r's shard has SIZES[r] rows; rank 1's is empty when W = 3


def shard_of(r: int, W: int) -> dict[str, torch.Tensor]:
    n = SIZES[r] if W == 3 else [4, 1][r]
    g = torch.Generator().manual_seed(100 + r)
    return {"item_factors": torch.randn(n, 2, generator=g),
            "item_bias": torch.randn(n, generator=g),
            "ids": torch.arange(n, dtype=torch.int64) + 1000 * r,
            "stamp": torch.full((1,), r, dtype=torch.int64)}


def _ring_rank(rank: int, W: int):
    ring = Ring(DistWorld(rank, W, torch.device("cpu"), "gloo"))
    held = shard_of(rank, W)
    seen = []
    for _ in range(W):
        held = ring.shift(held)
        # numpy, not tensors: torch would pass tensors back through shared-memory file
        # descriptors that vanish when the rank exits
        seen.append({k: v.numpy().copy() for k, v in held.items()})
    return seen, ring.bytes_sent, ring.header_bytes_sent, ring.shifts


@pytest.mark.multiprocess
def test_shift_rotates_ragged_shards_and_comes_home():
    W = 3
    results = run_ranks(_ring_rank, W)
    for r, (seen, sent, header, shifts) in enumerate(results):
        assert shifts == W
        for s, held in enumerate(seen, start=1):
            want = shard_of((r + s) % W, W)
            assert held.keys() == want.keys()
            for k in want:
                got = torch.from_numpy(held[k])
                assert got.dtype == want[k].dtype
                assert torch.equal(got, want[k]), (r, s, k)
        # payload: every shard this rank held before each shift, i.e. each rank's once
        payload = sum(t.numel() * t.element_size() for q in range(W)
                      for t in shard_of(q, W).values())
        assert sent == payload
        assert header == W * 8 * 5  # 2 + 1 + 1 + 1 dimensions per shift


def test_one_process_is_identity():
    ring = Ring(World())
    t = shard_of(0, 2)
    assert ring.shift(t) is t
    assert ring.bytes_sent == 0 and ring.shifts == 0
