"""The one place that picks a training method's class and its torch or Triton step
functions (through :func:`svdfill.kernels.dispatch.training_ops`)."""

from __future__ import annotations

from svdfill.config import Config
from svdfill.distributed.world import World
from svdfill.kernels.dispatch import training_ops
from svdfill.train.shard import TrainShard
from svdfill.train.solver import Solver


def row_sparse_without_autograd(cfg: Config, world: World) -> bool:
    """Whether ``train.optimizer`` runs as row-sparse steps without autograd.

    SparseAdam: same math as autograd + RowSparseAdam and ~2× faster on CPU, so always,
    except at W > 1 on gloo with ``kernel = "torch"``, where DDP all-reduces only the
    touched user rows (sparse); elsewhere the user sums travel densely anyway. Adagrad: with
    ``kernel = "fused"`` (lazy = torch's dense Adagrad when there is no decay).
    """
    t = cfg.train
    if t.solver != "sgd":
        return False
    if t.optimizer == "sparse_adam":
        return (t.kernel == "fused" or world.world_size == 1
                or not getattr(world, "sparse_users", True))
    return t.optimizer == "adagrad" and t.kernel == "fused"


def make_solver(cfg: Config, world: World, shard: TrainShard) -> Solver:
    """The solver of ``cfg.train`` on this rank's ``shard``.

    ``solver = "als"`` / ``"gibbs"``: :class:`~svdfill.train.als.ALSSolver` /
    :class:`~svdfill.train.gibbs.GibbsSolver`. ``solver = "sgd"``: by ``optimizer``, Funk
    SGD (:class:`~svdfill.train.funk_sgd.FunkSGD`), row-sparse steps
    (:class:`~svdfill.train.row_sparse.RowSparseSolver`, see
    :func:`row_sparse_without_autograd`) or a torch optimizer over autograd
    (:class:`~svdfill.train.autograd_optim.AutogradSolver`). ``kernel = "fused"`` gets the
    Triton steps where they compile, else the torch twins with one warning.
    """
    t = cfg.train
    if t.solver == "als":
        from svdfill.train.als import ALSSolver

        return ALSSolver(cfg, world, shard)
    if t.solver == "gibbs":
        from svdfill.train.gibbs import GibbsSolver

        return GibbsSolver(cfg, world, shard)
    if t.solver != "sgd":
        raise ValueError(f"no solver {t.solver!r}")
    if t.optimizer == "sgd":
        from svdfill.train.funk_sgd import FunkSGD

        return FunkSGD(cfg, world, shard, training_ops("sgd", world.device, t.kernel))
    if row_sparse_without_autograd(cfg, world):
        from svdfill.train.row_sparse import RowSparseSolver

        return RowSparseSolver(cfg, world, shard, t.optimizer,
                               training_ops(t.optimizer, world.device, t.kernel))
    from svdfill.train.autograd_optim import AutogradSolver

    return AutogradSolver(cfg, world, shard, t.optimizer)
