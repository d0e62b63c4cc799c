"""Float64 references the kernel tests compare against, written from the definitions (never
from the code under test), one copy each:

- :func:`topk_reference`: brute-force top-k of ``μ + b_u + b_i + p_u·q_i`` over unseen items,
  ties to the lower item id, padding (−inf, −1) last — the fill contract of
  ``kernels.fill.fill_topk`` and ``kernels.triton_fill.fill_topk_triton``.
- :func:`sgd_step_reference`: the Funk/Surprise SGD step of ``kernels.sgd.sgd_step`` and
  ``kernels.triton_sgd.fused_sgd_step`` (deltas from the pre-step values, repeated rows summed).
- :func:`lazy_adam_reference` / :func:`adagrad_reference`: the row-sparse optimizer steps of
  ``kernels.row_optim`` and ``kernels.triton_row_optim`` over a sequence of batches.

Plus the inputs the fill tests share (:func:`dyadic`, :func:`random_csr`,
:func:`csr_from_mask`, :func:`rounding_tie_inputs`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ----------------------------------------------------------------------------- the fill


def topk_reference(P, Q, bu, bi, mu, k, seen=None):
    """``(scores float64 [U, k], items int64 [U, k], S float64 [U, I])`` on the CPU: the
    top-k unseen items of every user by (score desc, item asc), missing → (−inf, −1);
    ``S`` holds every score, −inf where seen. ``seen`` is a CSR ``(indptr, indices)`` or
    None."""
    S = P.double().cpu() @ Q.double().cpu().T + bi.double().cpu()[None, :] \
        + bu.double().cpu()[:, None] + float(mu)
    U, I = S.shape
    if seen is not None:
        ip, ix = (t.cpu() for t in seen)
        for u in range(U):
            S[u, ix[ip[u]: ip[u + 1]].long()] = float("-inf")
    # a stable descending sort keeps equal scores in ascending item order
    order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, : min(k, I)]
    sc = torch.gather(S, 1, order)
    it = torch.where(torch.isneginf(sc), torch.full_like(order, -1), order)
    if k > I:
        sc = torch.cat([sc, torch.full((U, k - I), float("-inf"), dtype=sc.dtype)], 1)
        it = torch.cat([it, torch.full((U, k - I), -1, dtype=it.dtype)], 1)
    return sc, it, S


def assert_topk_exact(got, want, item_offset: int = 0):
    """``got = (scores, items)`` of a fill equals ``want`` (:func:`topk_reference`) bit for
    bit: float32 scores that are exactly the float64 ones, the same items (+ offset)."""
    s, i = got
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    ref_s, ref_i = want[0], want[1]
    ref_i = torch.where(ref_i >= 0, ref_i + item_offset, ref_i)
    assert torch.equal(i.cpu(), ref_i), (i.cpu(), ref_i)
    assert torch.equal(s.cpu().double(), ref_s), (s.cpu(), ref_s)


def dyadic(shape, gen, scale=4, lo=-4, hi=5):
    """Small multiples of 1/scale: float32 arithmetic on them is exact, and ties are common."""
    return torch.randint(lo, hi, shape, generator=gen).float() / scale


def random_csr(U, I, gen, full_rows=(), empty_rows=(), max_per_row=None):
    """Sorted per-row seen sets (int64 indptr, int32 indices); rows in ``full_rows`` have
    seen every item, rows in ``empty_rows`` none."""
    max_per_row = max_per_row or max(1, I // 3)
    indptr, indices = [0], []
    for u in range(U):
        if u in full_rows:
            row = list(range(I))
        elif u in empty_rows:
            row = []
        else:
            n = int(torch.randint(0, max_per_row + 1, (1,), generator=gen))
            row = sorted(torch.randperm(I, generator=gen)[:n].tolist())
        indices += row
        indptr.append(len(indices))
    return torch.tensor(indptr, dtype=torch.int64), torch.tensor(indices, dtype=torch.int32)


def csr_from_mask(mask: np.ndarray):
    """The CSR (int64 indptr, int32 indices, rows ascending) of a boolean [U, I] mask."""
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int32)  # row-major: sorted within rows
    return torch.from_numpy(indptr), torch.from_numpy(indices)


def rounding_tie_inputs():
    """Two items whose scores differ before μ + b_u is added and are one float32 after it:
    q_1 = q_0 + 2⁻²⁰, b_u = 1024 (an ulp there is 2⁻¹³); the higher raw score has the
    higher id, so ranking on unshifted scores breaks the tie rule. (User 1: no shift.)"""
    P = torch.tensor([[1.0], [1.0]])
    Q = torch.tensor([[0.25], [0.25 + 2.0 ** -20], [0.125]])
    bu, bi = torch.tensor([1024.0, 0.0]), torch.zeros(3)
    return P, Q, bu, bi


# ----------------------------------------------------------------------------- SGD


def sgd_step_reference(P, Q, bu, bi, mu, users, items, ratings, *, lr, reg_factors, reg_bias):
    """The SGD contract in float64 on the CPU: every rating's update from the pre-step
    values, repeated rows summed. Returns new (P, Q, bu, bi) float64 tensors."""
    P, Q, bu, bi = (t.detach().double().cpu().clone() for t in (P, Q, bu, bi))
    u, i, r = users.long().cpu(), items.long().cpu(), ratings.double().cpu()
    p, q, b1, b2 = P[u], Q[i], bu[u], bi[i]
    e = r - (float(mu) + b1 + b2 + (p * q).sum(1))
    P.index_add_(0, u, lr * (e[:, None] * q - reg_factors * p))
    Q.index_add_(0, i, lr * (e[:, None] * p - reg_factors * q))
    bu.index_add_(0, u, lr * (e - reg_bias * b1))
    bi.index_add_(0, i, lr * (e - reg_bias * b2))
    return P, Q, bu, bi


# ----------------------------------------------------------------------------- row optimizers

TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")


def _row_gradients(w, mu, u, i, r, scale, reg_factors, reg_bias):
    """{table: dense float64 gradient} of ``scale · (Σ (r − r̂)² + λ penalties)`` / 2 on the
    batch's rows (the trainer's loss scaled), and {table: touched rows}."""
    p, q = w["user_factors"][u], w["item_factors"][i]
    bu, bi = w["user_bias"][u], w["item_bias"][i]
    e = r.double() - (mu + bu + bi + (p * q).sum(1))
    grads = {"user_factors": (u, reg_factors * p - e[:, None] * q),
             "item_factors": (i, reg_factors * q - e[:, None] * p),
             "user_bias": (u, reg_bias * bu - e), "item_bias": (i, reg_bias * bi - e)}
    out = {}
    for k, (rows, g_rows) in grads.items():
        out[k] = (torch.zeros_like(w[k]).index_add_(0, rows, scale * g_rows), torch.unique(rows))
    return out


def lazy_adam_reference(model, data, *, lr, scale, reg_factors, reg_bias,
                        betas=(0.9, 0.999), eps=1e-8):
    """Lazy (row-sparse) Adam in float64 over ``data = [(users, items, ratings), …]``: only
    the rows a batch touches move, with torch SparseAdam's bias correction. Returns
    {table: float64 tensor}."""
    b1, b2 = betas
    w = {k: getattr(model, k).detach().double().cpu().clone() for k in TABLES}
    mom = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in w.items()}
    mu = float(model.global_mean)
    for t, (u, i, r) in enumerate(data, start=1):
        for k, (g, touched) in _row_gradients(w, mu, u.long().cpu(), i.long().cpu(), r.cpu(),
                                              scale, reg_factors, reg_bias).items():
            m, v = mom[k]
            m[touched] = b1 * m[touched] + (1 - b1) * g[touched]
            v[touched] = b2 * v[touched] + (1 - b2) * g[touched] ** 2
            m_hat, v_hat = m[touched] / (1 - b1 ** t), v[touched] / (1 - b2 ** t)
            w[k][touched] -= lr * m_hat / (v_hat.sqrt() + eps / math.sqrt(1 - b2 ** t))
    return w


def adagrad_reference(model, data, *, lr, scale, reg_factors, reg_bias, lr_decay=0.0,
                      eps=1e-10):
    """Adagrad (torch.optim.Adagrad's update, no weight decay) in float64 over ``data``:
    every row's sum of squared gradients grows by its gradient² (zero for untouched rows,
    which then do not move). Returns {table: float64 tensor}."""
    w = {k: getattr(model, k).detach().double().cpu().clone() for k in TABLES}
    acc = {k: torch.zeros_like(v) for k, v in w.items()}
    mu = float(model.global_mean)
    for t, (u, i, r) in enumerate(data, start=1):
        clr = lr / (1 + (t - 1) * lr_decay)
        for k, (g, _) in _row_gradients(w, mu, u.long().cpu(), i.long().cpu(), r.cpu(),
                                        scale, reg_factors, reg_bias).items():
            acc[k] += g * g
            w[k] -= clr * g / (acc[k].sqrt() + eps)
    return w
