"""kernels/threads.py: loops of small steps run on one CPU thread, and the count comes back."""

from __future__ import annotations

import pytest
import torch

from svdfill.kernels.threads import SMALL_STEP_RATINGS, small_step_threads


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_small_cpu_steps_run_on_one_thread_and_the_count_comes_back(two_threads):
    with small_step_threads("cpu", 1024):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with small_step_threads(torch.device("cpu"), SMALL_STEP_RATINGS):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # put back after an error too


def test_big_steps_and_other_devices_keep_their_threads(two_threads):
    with small_step_threads("cpu", SMALL_STEP_RATINGS + 1):
        assert torch.get_num_threads() == 2
    with small_step_threads("meta", 16):
        assert torch.get_num_threads() == 2


def test_an_sgd_epoch_runs_its_steps_on_one_thread(two_threads, monkeypatch):
    """FunkSGD's steps see one thread; the autograd optimizers' (dense Adam) keep two."""
    from svdfill.distributed.world import World
    from svdfill.train import make_solver
    from svdfill.train.shard import TrainShard
    from test_loop import _cfg, _data

    for optimizer, want in (("sgd", 1), ("adam", 2)):
        cfg = _cfg(**{"train.optimizer": optimizer})
        train, _ = _data(cfg)
        world = World()
        solver = make_solver(cfg, world, TrainShard.build(world, train, train.n_items, 0, train.n_items))
        seen, step = set(), solver.step

        def counting(*a, **k):
            seen.add(torch.get_num_threads())
            return step(*a, **k)

        monkeypatch.setattr(solver, "step", counting)
        solver.run_epoch("select", 1, False)
        assert seen == {want}, optimizer
        assert torch.get_num_threads() == 2
