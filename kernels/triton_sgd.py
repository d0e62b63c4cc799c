"""Fused biased-MF SGD step: one Triton kernel per batch (Hogwild on CUDA).

Same signature and math as :func:`svdfill.kernels.sgd.sgd_step` — for each rating
``e = r − (μ + b_u + b_i + p_u·q_i)`` and, from the values read before the update,

    b_u += lr (e − λ_b b_u)      b_i += lr (e − λ_b b_i)
    p_u += lr (e q_i − λ_f p_u)  q_i += lr (e p_u − λ_f q_i)

One program handles ``BLOCK_N`` ratings: it gathers their rows of P and Q (16-byte vector
loads along d), the two biases, computes the errors and the four deltas in registers and
applies them with atomic adds. Per rating that is 2·d·4 bytes read and 2·d atomic adds
(plus 4 scalars): the whole step is one pass over the touched rows, nothing staged in
device memory, versus torch's gather → products → ``index_add_`` chain of a dozen kernels.

What is guaranteed (documented contract, tested under the interpreter and on CUDA):

- No user or item appears twice in the batch: the result equals ``sgd_step`` up to float32
  rounding (the dot product's summation order differs).
- Repeated rows *within one program* (the first ``BLOCK_N`` ratings, the next ``BLOCK_N``, …):
  every program loads all its rows before it adds anything (a barrier separates the two),
  so their deltas come from the pre-update values and are summed — exactly ``sgd_step``'s
  semantics (with ``atomics=True``).
- Repeated rows *across programs*: Hogwild, as in cuMF_SGD and LibMF. Every delta is applied
  exactly once (atomics lose nothing), but a delta may be computed from a row another
  program has already updated in this batch. Convergence matches the torch step (tested:
  same RMSE ± 0.003); bitwise results are not reproducible run to run on CUDA.
- ``atomics=False`` replaces the adds by plain read-modify-write stores (cuMF_SGD's choice):
  faster where atomics contend, but concurrent updates of a row may be lost — including
  duplicates inside one program (the last store wins). Not the default.

On CPU tensors without ``TRITON_INTERPRET=1``, or without triton, the call runs the torch
``sgd_step`` instead, so one call works on every device.
"""

from __future__ import annotations

import math

import torch

from svdfill.kernels.triton_util import launch, next_pow2, triton_available, triton_mode

try:  # the kernel bodies need `tl` as a global; without triton they are never built
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    tl = None

_ELEMS_PER_PROGRAM = 2048
"""BLOCK_N · BLOCK_D per program (8 KiB of P and 8 KiB of Q rows in flight) with 8 warps:
at d=64 an sm_90 compile uses 109 registers and no stack; 4096 elements spilled (176 B)."""


def _sgd_kernel(
    P, Q, BU, BI, users_ptr, items_ptr, ratings_ptr, PD, BUD,
    n, d, stride_p, stride_q,
    mu, lr, reg_f, reg_b,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < n
    u = tl.load(users_ptr + offs, mask=m, other=0).to(tl.int64)
    i = tl.load(items_ptr + offs, mask=m, other=0).to(tl.int64)
    r = tl.load(ratings_ptr + offs, mask=m, other=0.0)
    cols = tl.arange(0, BLOCK_D)
    if EVEN_D:  # d == BLOCK_D: a mask constant along each row keeps 16-byte vector loads
        pm = m[:, None] & (cols < BLOCK_D)[None, :]
    else:
        pm = m[:, None] & (cols < d)[None, :]
    p_ptrs = P + u[:, None] * stride_p + cols[None, :]
    q_ptrs = Q + i[:, None] * stride_q + cols[None, :]
    # every load of the program happens before its first write: duplicates inside the
    # program see pre-update values, so their deltas sum as in the torch step
    p = tl.load(p_ptrs, mask=pm, other=0.0)
    q = tl.load(q_ptrs, mask=pm, other=0.0)
    bu = tl.load(BU + u, mask=m, other=0.0)
    bi = tl.load(BI + i, mask=m, other=0.0)
    pred = mu + bu + bi + tl.sum(p * q, axis=1)
    e = tl.where(m, r - pred, 0.0)
    dp = lr * (e[:, None] * q - reg_f * p)
    dq = lr * (e[:, None] * p - reg_f * q)
    dbu = lr * (e - reg_b * bu)
    dbi = lr * (e - reg_b * bi)
    # the program's warps all finish reading before any of them adds: without it one warp's
    # add could land before another warp of the same program loads a repeated row
    tl.debug_barrier()
    if SPLIT:
        # item-sharded rank: user deltas go to the delta tables (summed over ranks later)
        tl.atomic_add(PD + u[:, None] * stride_p + cols[None, :], dp, mask=pm, sem="relaxed")
        tl.atomic_add(BUD + u, dbu, mask=m, sem="relaxed")
        tl.atomic_add(q_ptrs, dq, mask=pm, sem="relaxed")
        tl.atomic_add(BI + i, dbi, mask=m, sem="relaxed")
    elif ATOMIC:
        tl.atomic_add(p_ptrs, dp, mask=pm, sem="relaxed")
        tl.atomic_add(q_ptrs, dq, mask=pm, sem="relaxed")
        tl.atomic_add(BU + u, dbu, mask=m, sem="relaxed")
        tl.atomic_add(BI + i, dbi, mask=m, sem="relaxed")
    else:
        tl.store(p_ptrs, p + dp, mask=pm)
        tl.store(q_ptrs, q + dq, mask=pm)
        tl.store(BU + u, bu + dbu, mask=m)
        tl.store(BI + i, bi + dbi, mask=m)


def _check(user_factors, item_factors, user_bias, item_bias, users, items, ratings) -> None:
    tables = {"user_factors": user_factors, "item_factors": item_factors,
              "user_bias": user_bias, "item_bias": item_bias}
    for name, t in tables.items():
        if t.dtype != torch.float32:
            raise TypeError(f"fused_sgd_step: {name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"fused_sgd_step: {name} must be contiguous (updated in place)")
        if t.device != user_factors.device:
            raise ValueError(f"fused_sgd_step: {name} is on {t.device}, "
                             f"user_factors on {user_factors.device}")
    if user_factors.dim() != 2 or item_factors.dim() != 2 \
            or user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError("fused_sgd_step: factor tables must be [U, d] and [I, d] with the same d, "
                         f"got {tuple(user_factors.shape)} and {tuple(item_factors.shape)}")
    if user_bias.shape != (user_factors.shape[0],) or item_bias.shape != (item_factors.shape[0],):
        raise ValueError("fused_sgd_step: biases must be [U] and [I]")
    n = ratings.shape[0]
    if users.shape != (n,) or items.shape != (n,) or ratings.dim() != 1:
        raise ValueError("fused_sgd_step: users, items, ratings must be 1-d of one length, got "
                         f"{tuple(users.shape)}, {tuple(items.shape)}, {tuple(ratings.shape)}")
    for name, t in (("users", users), ("items", items)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"fused_sgd_step: {name} must be int32 or int64, got {t.dtype}")


def fused_sgd_step(
    user_factors: torch.Tensor,
    item_factors: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    global_mean: float | torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    *,
    lr: float,
    reg_factors: float,
    reg_bias: float,
    atomics: bool = True,
    block_n: int | None = None,
    num_warps: int | None = None,
    user_factors_delta: torch.Tensor | None = None,
    user_bias_delta: torch.Tensor | None = None,
) -> None:
    """One SGD step over a batch, in place, as a single fused kernel.

    Args:
        user_factors: float32 ``[U, d]``, contiguous; updated in place.
        item_factors: float32 ``[I, d]``, contiguous; updated in place.
        user_bias: float32 ``[U]``; item_bias: float32 ``[I]``; updated in place.
        global_mean: μ, a float or 0-d tensor (not trained).
        users: int32/int64 ``[n]`` rows of ``user_factors``.
        items: int32/int64 ``[n]`` rows of ``item_factors`` (local to the shard).
        ratings: float32 ``[n]``.
        lr, reg_factors, reg_bias: learning rate, λ_f, λ_b.
        atomics: atomic adds (default; no update lost) or plain Hogwild stores.
        block_n: ratings per program (power of two); default keeps 4096 elements per
            program. Duplicate rows inside one program get exact summed semantics.
        num_warps: warps per program (default 8 for ≥ 2048 elements per program, else 4).
        user_factors_delta, user_bias_delta: internal to :func:`fused_sgd_step_split`
            (both or neither); use that function.

    Indices are not bounds-checked on the device (that would cost a sync per step); the
    trainer's ids come from the id map and are in range by construction.
    """
    _check(user_factors, item_factors, user_bias, item_bias, users, items, ratings)
    mode = triton_mode(user_factors.device)
    if (user_factors_delta is None) != (user_bias_delta is None):
        raise ValueError("fused_sgd_step: give both user delta tables or neither")
    if mode is None:
        from svdfill.kernels import sgd

        if user_factors_delta is not None:
            sgd.sgd_step_split(user_factors, item_factors, user_bias, item_bias, global_mean,
                               users, items, ratings, lr=lr, reg_factors=reg_factors,
                               reg_bias=reg_bias, user_factors_delta=user_factors_delta,
                               user_bias_delta=user_bias_delta)
        else:
            sgd.sgd_step(user_factors, item_factors, user_bias, item_bias, global_mean, users,
                         items, ratings, lr=lr, reg_factors=reg_factors, reg_bias=reg_bias)
        return
    n = ratings.shape[0]
    if n == 0:
        return
    d = user_factors.shape[1]
    block_d = max(4, next_pow2(d))  # = d for powers of two ≥ 4: 16-byte vector loads
    if block_n is None:
        block_n = max(16, min(1024, _ELEMS_PER_PROGRAM // block_d))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"fused_sgd_step: block_n must be a power of two, got {block_n}")
    mu = float(global_mean)
    ratings = ratings.contiguous()
    users = users.contiguous()
    items = items.contiguous()
    grid = (math.ceil(n / block_n),)
    split = user_factors_delta is not None
    launch(
        _sgd_kernel, user_factors.device, grid,
        user_factors, item_factors, user_bias, item_bias, users, items, ratings,
        user_factors_delta if split else user_factors, user_bias_delta if split else user_bias,
        n, d, user_factors.stride(0), item_factors.stride(0),
        mu, float(lr), float(reg_factors), float(reg_bias),
        BLOCK_N=block_n, BLOCK_D=block_d, ATOMIC=bool(atomics), SPLIT=split,
        EVEN_D=block_d == d, num_warps=num_warps or (8 if block_n * block_d >= 2048 else 4),
    )


def fused_sgd_step_split(
    user_factors: torch.Tensor,
    item_factors: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    global_mean: float | torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    *,
    lr: float,
    reg_factors: float,
    reg_bias: float,
    user_factors_delta: torch.Tensor,
    user_bias_delta: torch.Tensor,
    block_n: int | None = None,
) -> None:
    """Fused twin of :func:`svdfill.kernels.sgd.sgd_step_split` (one rank of an item-sharded
    world): item rows updated in place, user deltas *added* (atomically) to
    ``user_factors_delta`` float32 [U, d] and ``user_bias_delta`` float32 [U]; the user tables
    are only read. Same guarantees as :func:`fused_sgd_step` with ``atomics=True``; the user
    side is exact even with repeated users (they are never written during the step).
    """
    if user_factors_delta.shape != user_factors.shape or user_bias_delta.shape != user_bias.shape:
        raise ValueError("fused_sgd_step_split: delta tables must have the shapes of the user "
                         "tables")
    for name, t in (("user_factors_delta", user_factors_delta),
                    ("user_bias_delta", user_bias_delta)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != user_factors.device:
            raise ValueError(f"fused_sgd_step_split: {name} must be contiguous float32 on "
                             f"{user_factors.device}")
    if triton_mode(user_factors.device) is None:
        _check(user_factors, item_factors, user_bias, item_bias, users, items, ratings)
        from svdfill.kernels.sgd import sgd_step_split

        sgd_step_split(user_factors, item_factors, user_bias, item_bias, global_mean, users,
                       items, ratings, lr=lr, reg_factors=reg_factors, reg_bias=reg_bias,
                       user_factors_delta=user_factors_delta, user_bias_delta=user_bias_delta)
        return
    fused_sgd_step(user_factors, item_factors, user_bias, item_bias, global_mean, users, items,
                   ratings, lr=lr, reg_factors=reg_factors, reg_bias=reg_bias, block_n=block_n,
                   user_factors_delta=user_factors_delta, user_bias_delta=user_bias_delta)


def _probe_kernel(X, n, B: tl.constexpr):
    """X[i] = i + 1 for i < n: the smallest kernel that compiles, launches and stores."""
    i = tl.arange(0, B)
    tl.store(X + i, (i + 1).to(tl.float32), mask=i < n)


def probe(device: torch.device | str) -> None:
    """Compile and launch a tiny kernel on ``device`` and check what it wrote; raises what
    the build or launch raised (no triton mode, no C compiler or ``Python.h`` for Triton's
    launcher, a driver error) or RuntimeError on wrong values. Used once per device by
    :func:`svdfill.kernels.dispatch.probe_fused` before the fused training kernels are
    handed out."""
    x = torch.zeros(16, dtype=torch.float32, device=device)
    launch(_probe_kernel, x.device, (1,), x, 13, B=16)
    want = torch.arange(1, 17, dtype=torch.float32)
    want[13:] = 0.0
    if not torch.equal(x.cpu(), want):
        raise RuntimeError(f"the probe kernel wrote {x.cpu().tolist()}, expected {want.tolist()}")


def compile_specs(d: int = 64) -> list[tuple[str, dict, dict, int]]:
    """(label, signature, constexprs, num_warps) of the variants the CUDA path launches for
    factor dimension ``d`` — for :func:`svdfill.kernels.triton_util.compile_report`."""
    block_d = max(4, next_pow2(d))  # = d for powers of two ≥ 4: 16-byte vector loads
    block_n = max(16, min(1024, _ELEMS_PER_PROGRAM // block_d))
    sig = {"P": "*fp32", "Q": "*fp32", "BU": "*fp32", "BI": "*fp32", "users_ptr": "*i32",
           "items_ptr": "*i32", "ratings_ptr": "*fp32", "PD": "*fp32", "BUD": "*fp32",
           "n": "i32", "d": "i32", "stride_p": "i32", "stride_q": "i32", "mu": "fp32",
           "lr": "fp32", "reg_f": "fp32", "reg_b": "fp32"}
    out = []
    for label, atomic, split in (("atomics", True, False), ("plain stores", False, False),
                                 ("split", True, True)):
        out.append((f"sgd d={d} {label}", sig,
                    {"BLOCK_N": block_n, "BLOCK_D": block_d, "ATOMIC": atomic, "SPLIT": split,
                     "EVEN_D": block_d == d},
                    8 if block_n * block_d >= 2048 else 4))
    return out


__all__ = ["fused_sgd_step", "fused_sgd_step_split", "triton_available"]
