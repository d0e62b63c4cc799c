"""Alternating least squares (``solver = "als"``): one epoch is one sweep, every user's
then every item's regularized least-squares solve, batched on the device.

At W > 1 each rank solves its item shard alone, and the users' normal equations are summed
over the ranks block by block of user ids (``world.all_reduce_sum``), so every rank solves
the same user systems from the global rating counts.
"""

from __future__ import annotations

from svdfill.train.solver import Solver


class ALSSolver(Solver):
    """Closed-form sweeps with the penalties ``reg_factors·n^α`` and ``reg_bias·n^β``
    (``[train.als]``); no learning rate, no optimizer state."""

    name = "als"

    def run_epoch(self, phase: str, epoch: int, progress: bool) -> None:
        als_sweep_shard(self)


def als_sweep_shard(solver: Solver) -> None:
    """One ALS sweep of ``solver``'s model over its shard's ratings, with its regularization
    and ``[train.als]`` exponents (also the Gibbs chain's warm start)."""
    from svdfill.kernels.als import als_sweep

    d, world, a = solver.data, solver.world, solver.cfg.train.als
    sharded = world.world_size > 1
    als_sweep(solver.model, d.users, d.items, d.ratings, reg_factors=solver.reg_f,
              reg_bias=solver.reg_b, reg_exponent=a.reg_exponent,
              bias_reg_exponent=a.bias_reg_exponent,
              user_sum=world.all_reduce_sum if sharded else None,
              user_counts=solver.shard.user_counts if sharded else None)
