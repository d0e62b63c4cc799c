"""Row-sparse optimizer steps for biased MF without autograd — lazy Adam and Adagrad: one
step = gradient sums, then the update of the rows the batch touched.

The loss of a batch is ``scale · ½ (Σ e² + Σ λ_f(‖p_u‖² + ‖q_i‖²) + λ_b(b_u² + b_i²))`` with
``e = r − (μ + b_u + b_i + p_u·q_i)`` — the trainer's autograd loss. Its gradient rows are
written analytically:

    ∂/∂p_u = scale · Σ_(ratings of u) (λ_f p_u − e q_i)     (likewise q_i, b_u, b_i)

and every touched row then takes the optimizer's update:

- :func:`apply_adam`: :class:`svdfill.kernels.sgd.RowSparseAdam`'s (= ``torch.optim.SparseAdam``):
  moments of untouched rows stay, bias correction uses the optimizer's global step;
- :func:`apply_adagrad`: ``torch.optim.Adagrad``'s (without weight decay). Adagrad with a
  zero gradient leaves a row and its sum as they are, so updating only the touched rows *is*
  torch's dense Adagrad — for the cost of the touched rows.

Two phases instead of one, because both need a row's *summed* gradient before it can move
the row:

1. :func:`accumulate_gradients` adds the batch's gradient rows to per-side sums
   (``RowSide.factors_grad`` …) and marks the rows in ``touched``;
2. ``apply_*`` updates the touched rows from their sums, then clears sums and marks.

Between the two, an item-sharded world all-reduces the user side's sums and marks (the user
tables are replicated), which makes a step of W ranks the single-process step over the union
of their batches — a dense all-reduce that works on every backend, nccl included.

This module is the exact torch twin of :mod:`svdfill.kernels.triton_row_optim` (the fused
CUDA kernels, same functions and arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from svdfill.kernels.sgd import _errors


@dataclass
class RowSide:
    """One side (users or items) of a biased-MF model under a row-sparse optimizer.

    factors float32 [R, d] and bias float32 [R]: the parameters, updated in place.
    factors_m / factors_v [R, d], bias_m / bias_v [R]: the optimizer state, shared with the
    torch optimizer (not copied) — Adam's ``exp_avg`` / ``exp_avg_sq``; for Adagrad ``_v`` is
    its ``sum`` and ``_m`` is not used (pass ``_v`` again).
    factors_grad [R, d], bias_grad [R]: the step's gradient sums, all zero between steps.
    touched int32 [R]: nonzero for the rows the step's batch contains, zero between steps.
    All contiguous, on one device.
    """

    factors: torch.Tensor
    bias: torch.Tensor
    factors_m: torch.Tensor
    factors_v: torch.Tensor
    bias_m: torch.Tensor
    bias_v: torch.Tensor
    factors_grad: torch.Tensor
    bias_grad: torch.Tensor
    touched: torch.Tensor

    @classmethod
    def of(cls, factors: torch.Tensor, bias: torch.Tensor, factors_m: torch.Tensor,
           factors_v: torch.Tensor, bias_m: torch.Tensor, bias_v: torch.Tensor) -> "RowSide":
        """The side of existing parameters and moments, with fresh (zero) scratch."""
        side = cls(factors, bias, factors_m, factors_v, bias_m, bias_v,
                   torch.zeros_like(factors), torch.zeros_like(bias),
                   torch.zeros(factors.shape[0], dtype=torch.int32, device=factors.device))
        side.check()
        return side

    @property
    def rows(self) -> int:
        return int(self.factors.shape[0])

    def check(self) -> None:
        R = self.rows
        if self.factors.dim() != 2:
            raise ValueError(f"RowSide: factors must be [R, d], got {tuple(self.factors.shape)}")
        for name in ("factors", "factors_m", "factors_v", "factors_grad", "bias", "bias_m",
                     "bias_v", "bias_grad", "touched"):
            t = getattr(self, name)
            want = self.factors.shape if name.startswith("factors") else (R,)
            dtype = torch.int32 if name == "touched" else torch.float32
            if tuple(t.shape) != tuple(want) or t.dtype != dtype:
                raise ValueError(f"RowSide: {name} must be {dtype} {tuple(want)}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
            if not t.is_contiguous() or t.device != self.factors.device:
                raise ValueError(f"RowSide: {name} must be contiguous on {self.factors.device}")


def model_sides(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[RowSide, RowSide]:
    """(users side, items side) of a :class:`~svdfill.kernels.model.BiasedMF` over the state
    of its optimizer — :class:`~svdfill.kernels.sgd.RowSparseAdam` (moments made if new) or
    ``torch.optim.Adagrad`` (its sums) — with fresh scratch. Build it again after the
    optimizer's state is replaced (a loaded checkpoint)."""
    from svdfill.kernels.sgd import RowSparseAdam

    if isinstance(optimizer, RowSparseAdam):
        state = optimizer.moments
    elif isinstance(optimizer, torch.optim.Adagrad):
        def state(p):
            return optimizer.state[p]["sum"], optimizer.state[p]["sum"]  # m unused
    else:
        raise TypeError(f"model_sides: a RowSparseAdam or Adagrad, not {type(optimizer).__name__}")
    m = model
    return (RowSide.of(m.user_factors.data, m.user_bias.data, *state(m.user_factors),
                       *state(m.user_bias)),
            RowSide.of(m.item_factors.data, m.item_bias.data, *state(m.item_factors),
                       *state(m.item_bias)))


def step_size(lr: float, step: int, betas: tuple[float, float]) -> float:
    """Adam's bias-corrected step ``lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` for step ``t ≥ 1``."""
    if step < 1:
        raise ValueError(f"Adam step counts from 1, got {step}")
    beta1, beta2 = betas
    return lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)


@torch.no_grad()
def accumulate_gradients(user_side: RowSide, item_side: RowSide,
                         global_mean: float | torch.Tensor, users: torch.Tensor,
                         items: torch.Tensor, ratings: torch.Tensor, *, reg_factors: float,
                         reg_bias: float, scale: float) -> None:
    """Add one batch's loss gradient to both sides' sums and mark its rows.

    users int32/int64 [n] (rows of the user side), items [n] (rows of the item side, local
    to a shard), ratings float32 [n]. Reads the parameters only: call it as often as
    wanted before :func:`apply_adam` / :func:`apply_adagrad` (sums accumulate).
    """
    users = users.long()
    items = items.long()
    p, q, b_u, b_i, e = _errors(user_side.factors, item_side.factors, user_side.bias,
                                item_side.bias, global_mean, users, items, ratings)
    ec = e.unsqueeze(1)
    user_side.factors_grad.index_add_(0, users, (reg_factors * p - ec * q).mul_(scale))
    item_side.factors_grad.index_add_(0, items, (reg_factors * q - ec * p).mul_(scale))
    user_side.bias_grad.index_add_(0, users, (reg_bias * b_u - e).mul_(scale))
    item_side.bias_grad.index_add_(0, items, (reg_bias * b_i - e).mul_(scale))
    user_side.touched.index_fill_(0, users, 1)
    item_side.touched.index_fill_(0, items, 1)


def _adam_rows(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               rows: torch.Tensor, size: float, beta1: float, beta2: float, eps: float) -> None:
    # RowSparseAdam's arithmetic, operation for operation: the paths then differ only by the
    # order in which autograd and index_add_ sum a row's gradients
    grad = g.index_select(0, rows)
    m_new = m.index_select(0, rows)
    m_new = m_new + (grad - m_new) * (1 - beta1)
    v_new = v.index_select(0, rows)
    v_new = v_new + (grad * grad - v_new) * (1 - beta2)
    m.index_copy_(0, rows, m_new)
    v.index_copy_(0, rows, v_new)
    w.index_add_(0, rows, m_new / (v_new.sqrt() + eps) * (-size))
    g.index_fill_(0, rows, 0.0)


def adagrad_lr(lr: float, step: int, lr_decay: float = 0.0) -> float:
    """Adagrad's decayed rate ``lr / (1 + (t − 1)·lr_decay)`` for step ``t ≥ 1``."""
    if step < 1:
        raise ValueError(f"Adagrad step counts from 1, got {step}")
    return lr / (1 + (step - 1) * lr_decay)


def _adagrad_rows(w: torch.Tensor, acc: torch.Tensor, g: torch.Tensor, rows: torch.Tensor,
                  clr: float, eps: float) -> None:
    # torch.optim.Adagrad's single-tensor arithmetic (sum += g², w += −clr · g / (√sum + ε))
    grad = g.index_select(0, rows)
    acc_new = acc.index_select(0, rows).addcmul_(grad, grad, value=1)
    acc.index_copy_(0, rows, acc_new)
    w.index_add_(0, rows, grad.div_(acc_new.sqrt().add_(eps)).mul_(-clr))
    g.index_fill_(0, rows, 0.0)


@torch.no_grad()
def apply_adagrad(side: RowSide, *, lr: float, step: int, lr_decay: float = 0.0,
                  eps: float = 1e-10) -> None:
    """Adagrad update of the touched rows of ``side``, in place (``side.factors_v`` /
    ``bias_v`` are the sums), with the optimizer's step ``step`` (≥ 1, already counted);
    then the gradient sums and marks of those rows are zero again."""
    rows = side.touched.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    clr = adagrad_lr(lr, step, lr_decay)
    _adagrad_rows(side.factors, side.factors_v, side.factors_grad, rows, clr, eps)
    _adagrad_rows(side.bias, side.bias_v, side.bias_grad, rows, clr, eps)
    side.touched.zero_()


@torch.no_grad()
def apply_adam(side: RowSide, *, lr: float, step: int,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Lazy-Adam update of the touched rows of ``side`` (factors and bias), in place, with
    the optimizer's step count ``step`` (≥ 1, already incremented for this step); then the
    sums and marks of those rows are zero again."""
    rows = side.touched.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    size = step_size(lr, step, betas)
    beta1, beta2 = betas
    _adam_rows(side.factors, side.factors_m, side.factors_v, side.factors_grad, rows, size,
               beta1, beta2, eps)
    _adam_rows(side.bias, side.bias_m, side.bias_v, side.bias_grad, rows, size, beta1, beta2, eps)
    side.touched.zero_()


__all__ = ["RowSide", "accumulate_gradients", "adagrad_lr", "apply_adagrad", "apply_adam",
           "model_sides", "step_size"]
