"""A 2-node Ray cluster on one machine (``ray start --head`` + ``ray start --address`` with
its own resources): the fill's item-shard actors land on both nodes and the Parquet output
equals the single-process fill."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ray_helpers import add_node, ray_env, shared_head
from test_torchrun import assert_same_fill, single_process_fill


@pytest.fixture(scope="module")
def head(request):
    return shared_head(request)


def _alive_nodes(head) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=head.dashboard_url) if n.state == "ALIVE"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A model trained for 2 epochs on planted synthetic data (one process, seconds)."""
    import torch

    from svdfill.config import Config, apply_overrides
    from svdfill.train import run_training

    d = tmp_path_factory.mktemp("cluster")
    cfg = apply_overrides(Config(), {"data.synthetic.n_users": 1500, "data.synthetic.n_items": 400,
                                     "data.synthetic.n_ratings": 40_000, "model.factors": 16,
                                     "train.epochs": 2, "train.batch_size": 512, "train.patience": 0})
    torch.set_num_threads(1)
    run_training(cfg, d / "model", quiet=True)
    return d / "model"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fill_across_two_nodes(head, small_model, tmp_path):
    node2 = add_node(head, num_cpus=1, resources={"second_node": 1})
    try:
        deadline = time.monotonic() + 60
        while len(_alive_nodes(head)) < 2:
            assert time.monotonic() < deadline, "second node did not join"
            time.sleep(0.5)
        ips = {n.node_ip for n in _alive_nodes(head)}
        assert ips == {"127.0.0.1"}
        got = tmp_path / "ray2.parquet"
        # item shards (not the replicated table a model this small gets by default): every
        # block is computed by both actors, on two nodes, and merged
        cmd = [sys.executable, "-m", "svdfill.launch.ray_job", "fill", "--model", str(small_model),
               "--k", "20", "--out", str(got), "--num-actors", "2", "--user-block", "400",
               "--address", head.gcs_address, "--item-split", "shard"]
        p = subprocess.run(cmd, env=ray_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=180)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        assert "from node 127.0.0.1" in p.stdout
        assert "2 fill actors on 2 node(s)" in p.stdout, p.stdout[-3000:]
        from svdfill.checkpoint import load_model
        from svdfill.distributed.sharding import even_shards

        n_items = int(load_model(small_model).state["item_factors"].shape[0])
        (a, b), (c, e) = even_shards(n_items, 2)
        assert f"items [{a}, {b})" in p.stdout and f"items [{c}, {e})" in p.stdout, p.stdout[-3000:]
        ref = tmp_path / "single.parquet"
        single_process_fill(small_model, ref, "--k", "20", "--user-block", "400")
        assert_same_fill(got, ref)

        # the partitioned export over item shards: each actor writes its part, asking the
        # actor on the other node for its shard's lists
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        ds = tmp_path / "ds"
        p = subprocess.run(cmd[:cmd.index("--out") + 1] + [f"{ds}/"] + cmd[cmd.index("--out") + 2:],
                           env=ray_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        back = pads.dataset(ds, format="parquet").to_table()
        one = pq.read_table(got)
        for col in ("user_id", "item_id", "rank", "score"):
            assert back.column(col).equals(one.column(col)), col  # merged the same way: same bits
    finally:
        node2.stop()
    assert not node2.alive() and not node2.temp_dir.exists()


def _random_state(U=37, I=23, d=5, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"user_factors": torch.randn(U, d, generator=g), "item_factors": torch.randn(I, d, generator=g),
            "user_bias": torch.randn(U, generator=g), "item_bias": torch.randn(I, generator=g),
            "global_mean": torch.tensor(3.5)}


def _check_shards_merge_to_full(device):
    """What each fill actor computes (its shard, seen pairs made local, global ids) merges to
    the one-process top-k, for ragged shards and users in any order."""
    import numpy as np
    import torch

    from svdfill.data.csr import build_csr
    from svdfill.distributed.ray_fill import ShardActor
    from svdfill.kernels.fill import csr_take, fill_topk, merge_topk

    st = _random_state()
    U, I = st["user_factors"].shape[0], st["item_factors"].shape[0]
    g = torch.Generator().manual_seed(1)
    seen = build_csr(torch.randint(0, U, (200,), generator=g), torch.randint(0, I, (200,), generator=g), U)
    users = np.array([5, 0, 36, 17, 17 - 3], dtype=np.int64)
    rows = torch.from_numpy(users)
    ref = fill_topk(st["user_factors"][rows], st["item_factors"], st["user_bias"][rows],
                    st["item_bias"], 3.5, 6, csr_take(seen[0], seen[1], rows))
    np_state = {k: v.numpy() for k, v in st.items()}
    parts = []
    for shard in [(0, 4), (4, 15), (15, 23)]:
        a = ShardActor(shard, np_state["item_factors"], np_state["item_bias"], np_state["user_factors"],
                       np_state["user_bias"], 3.5, (seen[0].numpy(), seen[1].numpy()), 6, None, None)
        assert a.device.type == device
        s, i = a.topk(users)
        assert ((i == -1) | ((i >= shard[0]) & (i < shard[1]))).all()
        parts.append((torch.from_numpy(s), torch.from_numpy(i)))
    s, i = merge_topk(parts, 6)
    assert torch.equal(i, ref[1])
    torch.testing.assert_close(s, ref[0], rtol=1e-6, atol=1e-6)


def test_fill_shard_actor_logic_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the actor picks CUDA here; covered by the cuda test")
    _check_shards_merge_to_full("cpu")


@pytest.mark.cuda
def test_fill_shard_actor_logic_on_gpu(cuda):
    """A fill actor with a GPU keeps its shard there (what --use-gpu gives each actor)."""
    _check_shards_merge_to_full("cuda")
