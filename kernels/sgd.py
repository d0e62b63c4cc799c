"""The Funk/Surprise SGD update of biased MF, for a batch of ratings, without autograd.

For each rating (u, i, r) with e = r − (μ + b_u + b_i + p_u·q_i), from the values the
tables hold *before* the step::

    b_u += lr (e − λ_b b_u)      b_i += lr (e − λ_b b_i)
    p_u += lr (e q_i − λ_f p_u)  q_i += lr (e p_u − λ_f q_i)

Contributions of rows repeated within one batch are summed (``index_add_``), so a batch of
one rating is exactly Surprise's per-rating step and regularization is applied once per
rating occurrence of a row, as Funk SVD does. :func:`svdfill.kernels.triton_sgd.fused_sgd_step`
is the fused CUDA twin (same signature and math).
"""

from __future__ import annotations

import math

import torch


def _errors(P, Q, bu, bi, mu, users, items, ratings):
    p = P.index_select(0, users)
    q = Q.index_select(0, items)
    b_u = bu.index_select(0, users)
    b_i = bi.index_select(0, items)
    e = ratings - (mu + b_u + b_i + (p * q).sum(1))
    return p, q, b_u, b_i, e


@torch.no_grad()
def sgd_step(user_factors: torch.Tensor, item_factors: torch.Tensor, user_bias: torch.Tensor,
             item_bias: torch.Tensor, global_mean: float | torch.Tensor, users: torch.Tensor,
             items: torch.Tensor, ratings: torch.Tensor, *, lr: float, reg_factors: float,
             reg_bias: float) -> None:
    """One SGD step over a batch, in place.

    user_factors float32 [U, d], item_factors float32 [I, d], user_bias [U], item_bias [I]
    (all on one device, updated in place); global_mean a float (or 0-d tensor); users,
    items int64 [n] (items local to the table's shard); ratings float32 [n].
    """
    # the user rows' deltas go straight into the user tables: the batch's rows were read
    # before any update, so this is the split step with W = 1
    sgd_step_split(user_factors, item_factors, user_bias, item_bias, global_mean, users, items,
                   ratings, lr=lr, reg_factors=reg_factors, reg_bias=reg_bias,
                   user_factors_delta=user_factors, user_bias_delta=user_bias)


@torch.no_grad()
def sgd_step_split(user_factors: torch.Tensor, item_factors: torch.Tensor,
                   user_bias: torch.Tensor, item_bias: torch.Tensor,
                   global_mean: float | torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                   ratings: torch.Tensor, *, lr: float, reg_factors: float, reg_bias: float,
                   user_factors_delta: torch.Tensor, user_bias_delta: torch.Tensor) -> None:
    """:func:`sgd_step` for one rank of an item-sharded world.

    The item rows (this rank's shard) are updated in place; the user-row deltas are *added*
    to ``user_factors_delta`` [U, d] and ``user_bias_delta`` [U] instead of the replicated
    user tables. The caller zeroes the deltas, sums them over ranks (all-reduce) and adds
    them to the user tables, which makes one step of W ranks equal one single-process step
    over the union of their batches.
    """
    users = users.long()
    items = items.long()
    p, q, b_u, b_i, e = _errors(user_factors, item_factors, user_bias, item_bias,
                                global_mean, users, items, ratings)
    ec = e.unsqueeze(1)
    user_factors_delta.index_add_(0, users, (ec * q - reg_factors * p).mul_(lr))
    item_factors.index_add_(0, items, (ec * p - reg_factors * q).mul_(lr))
    user_bias_delta.index_add_(0, users, (e - reg_bias * b_u).mul_(lr))
    item_bias.index_add_(0, items, (e - reg_bias * b_i).mul_(lr))


class RowSparseAdam(torch.optim.Optimizer):
    """:class:`torch.optim.SparseAdam`'s algorithm (lazy Adam: only the rows present in a
    sparse gradient update their moments and move), applied with ``index_select`` /
    ``index_copy_`` instead of dense += sparse additions.

    Why: on CPU, torch's dense-plus-sparse ``add_`` costs ~20 ms per call whatever the
    number of rows (measured, torch 2.13), which made SparseAdam ~7× slower per step than
    dense Adam on small tables; here a step costs what its touched rows cost. Same state
    names (``step`` int, ``exp_avg``, ``exp_avg_sq``) and the same arithmetic, checked
    against torch.optim.SparseAdam in tests/test_sgd.py.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"RowSparseAdam: bad lr {lr}, betas {betas} or eps {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of parameter ``p`` (created as zeros, step 0, when new):
        the tables the fused step (:mod:`svdfill.kernels.triton_row_optim`) updates in place, so
        its state is this optimizer's and checkpoints do not depend on the kernel."""
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["exp_avg"], st["exp_avg_sq"]

    def advance(self) -> int:
        """Count one step for every parameter, as :meth:`step` does; returns the new step
        (the fused path's bias correction). Parameters must share one count."""
        counts = set()
        for group in self.param_groups:
            for p in group["params"]:
                self.moments(p)
                self.state[p]["step"] += 1
                counts.add(self.state[p]["step"])
        if len(counts) != 1:
            raise RuntimeError(f"RowSparseAdam.advance: parameters at different steps {counts}")
        return counts.pop()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise RuntimeError("RowSparseAdam takes sparse gradients (model sparse=True)")
                grad = grad.coalesce()
                rows = grad._indices()[0]
                values = grad._values()
                self.moments(p)
                st = self.state[p]
                st["step"] += 1
                if rows.numel() == 0:
                    continue
                m_old = st["exp_avg"].index_select(0, rows)
                v_old = st["exp_avg_sq"].index_select(0, rows)
                m_new = m_old + (values - m_old) * (1 - beta1)
                v_new = v_old + (values * values - v_old) * (1 - beta2)
                st["exp_avg"].index_copy_(0, rows, m_new)
                st["exp_avg_sq"].index_copy_(0, rows, v_new)
                bc1 = 1 - beta1 ** st["step"]
                bc2 = 1 - beta2 ** st["step"]
                step_size = group["lr"] * math.sqrt(bc2) / bc1
                p.index_add_(0, rows, m_new / (v_new.sqrt() + group["eps"]) * (-step_size))
        return loss
