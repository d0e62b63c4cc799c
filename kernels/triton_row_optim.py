"""Fused row-sparse Adam and Adagrad for biased MF: two Triton kernels per batch instead of
torch's autograd forward + backward + optimizer chain (~30 kernels, and for SparseAdam a
sort; for dense Adagrad a pass over every row of every table).

Same functions, arguments and math as :mod:`svdfill.kernels.row_optim` (read it for the
loss and the update):

- :func:`fused_accumulate_gradients`: one program per ``BLOCK_N`` ratings gathers p_u, q_i
  and the biases (16-byte vector loads along d), computes the errors and *atomically adds*
  the four gradient rows to the sides' sums; it writes 1 to ``touched`` of its rows. The
  parameters are only read, so there is no race on them: unlike Hogwild SGD, the step is
  deterministic up to the order of float additions in the sums.
- :func:`fused_apply_adam` / :func:`fused_apply_adagrad` (one kernel body, the optimizer a
  constexpr): one program per ``BLOCK_R`` rows of a side reads the marks and, for marked
  rows only, the sums, optimizer state and parameters; writes the moved parameters, the
  state, and zeros into sums and marks (the scratch is clean for the next step without a
  memset). Unmarked rows cost 4 bytes.

Traffic per rating ≈ 2·d·4 B of gathers + 2·d atomic adds, plus per touched row
4 reads + 4 writes of d floats for Adam (parameter, 2 moments, sum), 3 + 3 for Adagrad —
about twice the fused SGD step, for optimizers that stay stable with million-rating batches.

Off CUDA (and without ``TRITON_INTERPRET=1``) both functions run the torch twin, so one
call works on every device.
"""

from __future__ import annotations

import math

import torch

from svdfill.kernels import row_optim
from svdfill.kernels.row_optim import RowSide, adagrad_lr, step_size
from svdfill.kernels.triton_util import launch, next_pow2, triton_mode

try:  # the kernel bodies need `tl` as a global; without triton they are never built
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    tl = None

_ELEMS_PER_PROGRAM = 2048
"""BLOCK_N · BLOCK_D per program of the gradient kernel (as the fused SGD step)."""
_APPLY_ELEMS = 4096
"""BLOCK_R · BLOCK_D per program of the apply kernel (streaming, 4 tables per row)."""


def _grad_kernel(
    P, Q, BU, BI, GP, GQ, GBU, GBI, TU, TI, users_ptr, items_ptr, ratings_ptr,
    n, d, stride_p, stride_q,
    mu, reg_f, reg_b, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < n
    u = tl.load(users_ptr + offs, mask=m, other=0).to(tl.int64)
    i = tl.load(items_ptr + offs, mask=m, other=0).to(tl.int64)
    r = tl.load(ratings_ptr + offs, mask=m, other=0.0)
    cols = tl.arange(0, BLOCK_D)
    if EVEN_D:  # a mask constant along each row keeps 16-byte vector loads
        pm = m[:, None] & (cols < BLOCK_D)[None, :]
    else:
        pm = m[:, None] & (cols < d)[None, :]
    p = tl.load(P + u[:, None] * stride_p + cols[None, :], mask=pm, other=0.0)
    q = tl.load(Q + i[:, None] * stride_q + cols[None, :], mask=pm, other=0.0)
    bu = tl.load(BU + u, mask=m, other=0.0)
    bi = tl.load(BI + i, mask=m, other=0.0)
    e = tl.where(m, r - (mu + bu + bi + tl.sum(p * q, axis=1)), 0.0)
    gp = (reg_f * p - e[:, None] * q) * scale
    gq = (reg_f * q - e[:, None] * p) * scale
    tl.atomic_add(GP + u[:, None] * stride_p + cols[None, :], gp, mask=pm, sem="relaxed")
    tl.atomic_add(GQ + i[:, None] * stride_q + cols[None, :], gq, mask=pm, sem="relaxed")
    tl.atomic_add(GBU + u, (reg_b * bu - e) * scale, mask=m, sem="relaxed")
    tl.atomic_add(GBI + i, (reg_b * bi - e) * scale, mask=m, sem="relaxed")
    one = tl.full((BLOCK_N,), 1, tl.int32)
    tl.store(TU + u, one, mask=m)  # every writer stores the same value: the race is benign
    tl.store(TI + i, one, mask=m)


def _apply_kernel(
    W, M, V, G, B, MB, VB, GB, T,
    R, d, stride,
    size, c1, c2, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ADAGRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = rows < R
    hit = (tl.load(T + rows, mask=inside, other=0) != 0) & inside
    cols = tl.arange(0, BLOCK_D)
    if EVEN_D:
        mk = hit[:, None] & (cols < BLOCK_D)[None, :]
    else:
        mk = hit[:, None] & (cols < d)[None, :]
    off = rows[:, None] * stride + cols[None, :]
    g = tl.load(G + off, mask=mk, other=0.0)
    v = tl.load(V + off, mask=mk, other=0.0)
    w = tl.load(W + off, mask=mk, other=0.0)
    gb = tl.load(GB + rows, mask=hit, other=0.0)
    vb = tl.load(VB + rows, mask=hit, other=0.0)
    b = tl.load(B + rows, mask=hit, other=0.0)
    # the torch optimizers' operations in their order, with IEEE sqrt and division (not the
    # fast approximations)
    if ADAGRAD:  # V, VB = sums; size = the decayed rate; M, MB, c1, c2 unused
        v = v + g * g
        w = w + tl.div_rn(g, tl.sqrt_rn(v) + eps) * (-size)
        vb = vb + gb * gb
        b = b + tl.div_rn(gb, tl.sqrt_rn(vb) + eps) * (-size)
    else:  # Adam; c1 = 1 − β₁ and c2 = 1 − β₂ rounded to float32 as torch rounds them
        m = tl.load(M + off, mask=mk, other=0.0)
        m = m + (g - m) * c1
        v = v + (g * g - v) * c2
        w = w + tl.div_rn(m, tl.sqrt_rn(v) + eps) * (-size)
        tl.store(M + off, m, mask=mk)
        mb = tl.load(MB + rows, mask=hit, other=0.0)
        mb = mb + (gb - mb) * c1
        vb = vb + (gb * gb - vb) * c2
        b = b + tl.div_rn(mb, tl.sqrt_rn(vb) + eps) * (-size)
        tl.store(MB + rows, mb, mask=hit)
    tl.store(V + off, v, mask=mk)
    tl.store(W + off, w, mask=mk)
    tl.store(G + off, tl.zeros((BLOCK_R, BLOCK_D), tl.float32), mask=mk)
    tl.store(VB + rows, vb, mask=hit)
    tl.store(B + rows, b, mask=hit)
    tl.store(GB + rows, tl.zeros((BLOCK_R,), tl.float32), mask=hit)
    tl.store(T + rows, tl.zeros((BLOCK_R,), tl.int32), mask=hit)


def _blocks(d: int, elems: int) -> tuple[int, int]:
    # BLOCK_D = d exactly when d is a power of two (≥ 4: one 16-byte vector): a padded row
    # (d=8 in 16 lanes) compiles to scalar loads
    block_d = max(4, next_pow2(d))
    return block_d, max(16, min(1024, elems // block_d))


def fused_accumulate_gradients(user_side: RowSide, item_side: RowSide,
                               global_mean: float | torch.Tensor, users: torch.Tensor,
                               items: torch.Tensor, ratings: torch.Tensor, *,
                               reg_factors: float, reg_bias: float, scale: float,
                               block_n: int | None = None) -> None:
    """:func:`svdfill.kernels.row_optim.accumulate_gradients` as one fused kernel.

    users / items int32 or int64 [n] (not bounds-checked on the device: a check costs a
    sync per step; the trainer's ids are in range by construction), ratings float32 [n].
    ``block_n``: ratings per program (power of two; default keeps 2048 elements).
    """
    device = user_side.factors.device
    if triton_mode(device) is None:
        row_optim.accumulate_gradients(user_side, item_side, global_mean, users, items,
                                       ratings, reg_factors=reg_factors, reg_bias=reg_bias,
                                       scale=scale)
        return
    d = user_side.factors.shape[1]
    if item_side.factors.shape[1] != d:
        raise ValueError(f"fused_accumulate_gradients: user d={d}, item d="
                         f"{item_side.factors.shape[1]}")
    n = ratings.shape[0]
    if users.shape != (n,) or items.shape != (n,):
        raise ValueError("fused_accumulate_gradients: users, items, ratings must be 1-d of one "
                         f"length, got {tuple(users.shape)}, {tuple(items.shape)}, {(n,)}")
    if n == 0:
        return
    block_d, default_n = _blocks(d, _ELEMS_PER_PROGRAM)
    block_n = block_n or default_n
    if block_n & (block_n - 1):
        raise ValueError(f"fused_accumulate_gradients: block_n must be a power of two, got {block_n}")
    us, its = user_side, item_side
    launch(
        _grad_kernel, device, (math.ceil(n / block_n),),
        us.factors, its.factors, us.bias, its.bias, us.factors_grad, its.factors_grad,
        us.bias_grad, its.bias_grad, us.touched, its.touched,
        users.contiguous(), items.contiguous(), ratings.contiguous().float(),
        n, d, us.factors.stride(0), its.factors.stride(0),
        float(global_mean), float(reg_factors), float(reg_bias), float(scale),
        BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == d,
        num_warps=8 if block_n * block_d >= 2048 else 4,
    )


def _apply(side: RowSide, size: float, c1: float, c2: float, eps: float, adagrad: bool,
           block_r: int | None) -> None:
    R, d = side.factors.shape
    if R == 0:
        return
    block_d, default_r = _blocks(d, _APPLY_ELEMS)
    block_r = block_r or default_r
    launch(
        _apply_kernel, side.factors.device, (math.ceil(R / block_r),),
        side.factors, side.factors_m, side.factors_v, side.factors_grad,
        side.bias, side.bias_m, side.bias_v, side.bias_grad, side.touched,
        R, d, side.factors.stride(0), float(size), float(c1), float(c2), float(eps),
        BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=block_d == d, ADAGRAD=bool(adagrad),
        num_warps=8 if block_r * block_d >= 4096 else 4,
    )


def fused_apply_adam(side: RowSide, *, lr: float, step: int,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     block_r: int | None = None) -> None:
    """:func:`svdfill.kernels.row_optim.apply_adam` as one fused kernel over the side's
    rows (a streaming pass; unmarked rows read only their mark)."""
    if triton_mode(side.factors.device) is None:
        row_optim.apply_adam(side, lr=lr, step=step, betas=betas, eps=eps)
        return
    beta1, beta2 = betas
    _apply(side, step_size(lr, step, betas), 1.0 - float(beta1), 1.0 - float(beta2), eps,
           False, block_r)


def fused_apply_adagrad(side: RowSide, *, lr: float, step: int, lr_decay: float = 0.0,
                        eps: float = 1e-10, block_r: int | None = None) -> None:
    """:func:`svdfill.kernels.row_optim.apply_adagrad` as one fused kernel over the side's
    rows (``side.factors_v`` / ``bias_v`` are Adagrad's sums)."""
    if triton_mode(side.factors.device) is None:
        row_optim.apply_adagrad(side, lr=lr, step=step, lr_decay=lr_decay, eps=eps)
        return
    _apply(side, adagrad_lr(lr, step, lr_decay), 0.0, 0.0, eps, True, block_r)


def compile_specs(d: int = 64) -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel body, signature, constexprs, num_warps) of the variants the CUDA path
    launches for factor dimension ``d`` — for :func:`triton_util.compile_report`."""
    block_d, block_n = _blocks(d, _ELEMS_PER_PROGRAM)
    _, block_r = _blocks(d, _APPLY_ELEMS)
    f32 = "*fp32"
    grad_sig = {"P": f32, "Q": f32, "BU": f32, "BI": f32, "GP": f32, "GQ": f32, "GBU": f32,
                "GBI": f32, "TU": "*i32", "TI": "*i32", "users_ptr": "*i32",
                "items_ptr": "*i32", "ratings_ptr": f32, "n": "i32", "d": "i32",
                "stride_p": "i32", "stride_q": "i32", "mu": "fp32", "reg_f": "fp32",
                "reg_b": "fp32", "scale": "fp32"}
    apply_sig = {"W": f32, "M": f32, "V": f32, "G": f32, "B": f32, "MB": f32, "VB": f32,
                 "GB": f32, "T": "*i32", "R": "i32", "d": "i32", "stride": "i32",
                 "size": "fp32", "c1": "fp32", "c2": "fp32", "eps": "fp32"}
    apply_warps = 8 if block_r * block_d >= 4096 else 4
    return [
        (f"row-opt gradients d={d}", _grad_kernel, grad_sig,
         {"BLOCK_N": block_n, "BLOCK_D": block_d, "EVEN_D": block_d == d},
         8 if block_n * block_d >= 2048 else 4),
        (f"adam apply d={d}", _apply_kernel, apply_sig,
         {"BLOCK_R": block_r, "BLOCK_D": block_d, "EVEN_D": block_d == d, "ADAGRAD": False},
         apply_warps),
        (f"adagrad apply d={d}", _apply_kernel, apply_sig,
         {"BLOCK_R": block_r, "BLOCK_D": block_d, "EVEN_D": block_d == d, "ADAGRAD": True},
         apply_warps),
    ]


__all__ = ["fused_accumulate_gradients", "fused_apply_adagrad", "fused_apply_adam"]
