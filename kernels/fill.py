"""Exact top-k fill of the user-item matrix by tiled block GEMMs (CPU and CUDA, one API).

For a block of users B and a tile of items T the scores are one GEMM,
``S = [P_B, 1] · [Q_T, b_T]ᵀ`` (the item bias rides in the GEMM as an extra column), seen
pairs are set to −inf by one vectorized scatter from the CSR slice of the block, the
tile's top-k per row is taken and merged with the running top-k of the earlier tiles.
``b_u + μ`` shifts a whole row, but it is added (in float32) to every tile *before* the
selection: after the addition two scores a few ulps apart can become one float32, and the
tie rule below must hold for the scores that are returned — the same rule
:func:`merge_topk` applies across item shards, so a sharded fill equals the single one.
Nothing of size U × I is ever allocated: tiles are sized from
free device memory (CUDA) or a budget (CPU, 256 MiB unless ``memory_budget`` says).

On CPU (issue 19: 600k × 3,000, k = 100 went from 9.5 s / 18.9 CPU-s to 5.9 s / 9.7 CPU-s
on the 2-core bench machine, same results; BENCHMARKS.md "CPU fill profile") each of torch's
intra-op thread count of workers runs whole user blocks (torch single-threaded inside):
cache-sized blocks (:data:`CPU_BLOCK_CELLS`), the GEMM into one reused buffer, then per
chunk of rows the seen mask (numpy fancy assignment of −inf), the ``μ + b_u`` add and
:func:`svdfill.kernels.topk.threshold_topk` (a threshold from group maxima, then one numpy
sort of the ~1.15·k candidates per row, exact with the same tie rule). CUDA keeps the torch
selection described next.

Ties are broken by the lower item id, always. ``torch.topk`` orders a tied group
arbitrarily, so each tile asks it for k + 1 *sorted* values: a row whose k + 1 values have
no equal neighbours is exact as it stands; rows with a tie are redone on composite int64
keys (order-preserving bits of the float32 score, then the reversed column), which are
unique. Wide tiles first keep only the k + 1 groups of columns with the largest maxima
(see :func:`svdfill.kernels.topk.tile_topk`), which cuts the top-k work about threefold on 3,000 items and
much more on 10^6. With float32 compute the result is therefore the exact ranking of the
float32 scores; whenever those are exact (e.g. dyadic inputs) it equals the float64
brute-force reference bit for bit. Tiles are merged with one stable sort (earlier tiles
hold lower ids), shards with :func:`merge_topk`.

Which fill runs (:func:`fill_topk` is the one entry point of both): on CUDA,
:func:`svdfill.kernels.dispatch.fill_kernel` decides between the fused Triton kernel
(:mod:`svdfill.kernels.triton_fill`) and these torch tiles; the tie rule and the CSR helpers
both use live in :mod:`svdfill.kernels.topk`.

Compute dtypes (``dtype``):
  * ``None`` / ``"float32"``: float32 GEMM (on CUDA with TF32 switched off for the call).
  * ``"tf32"``: TF32 tensor-core GEMM on CUDA (10-bit mantissa inputs, fp32 accumulate);
    identical to float32 on CPU. Scores differ from float32 by about
    ``2**-11 · Σ_j |p_uj q_ij|`` per pair, so items whose scores lie within that of the
    k-th score may trade places; the returned set is otherwise the float32 one.
  * ``"bfloat16"``: bf16 inputs (8-bit mantissa), fp32 accumulate; the tolerance is
    ``2**-8 · (Σ_j |p_uj q_ij| + |b_i|)`` per pair, in the same sense.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from svdfill.kernels import dispatch
from svdfill.kernels.topk import (CSR, csr_slice, csr_take, merge_topk, seen_by_tile,
                                  threshold_topk, tile_topk)

Tensor = torch.Tensor

__all__ = ["fill_topk", "merge_topk", "score_dense", "csr_take", "csr_slice", "tile_sizes",
           "device_dtype", "DEFAULT_CPU_BUDGET", "BYTES_PER_CELL"]

DEFAULT_CPU_BUDGET = 256 * 2**20
"""Bytes of score tiles on CPU when no ``memory_budget`` is given."""

BYTES_PER_CELL = 16
"""Working bytes per (user, item) cell of a tile: the fp32 scores, the scatter/topk scratch
and, for tied rows, the int64 composite keys."""

_MAX_ITEM_TILE = 1 << 20
_CPU_FILL_LOCK = threading.Lock()

CPU_BLOCK_CELLS = 1 << 20
"""CPU: (user, item) cells per block of users (4 MiB of float32 scores; 349 users × 3,000
items): each thread's block stays in cache from its GEMM through the mask and the selection
(the GEMM alone ran 2× faster into a cache-sized buffer than into a 67 MiB one)."""

CPU_SELECT_CELLS = 1 << 18
"""CPU: cells per chunk of rows that one thread selects from (1 MiB of scores: the group
maxima, the compare and the candidate reads then hit the L2 cache)."""


def _check_inputs(user_factors, item_factors, user_bias, item_bias, seen) -> None:
    if user_factors.dim() != 2 or item_factors.dim() != 2:
        raise ValueError("user_factors and item_factors must be 2-d [n, d]")
    if user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError(f"factor dims differ: users d={user_factors.shape[1]}, items d={item_factors.shape[1]}")
    if user_bias.shape != (user_factors.shape[0],):
        raise ValueError(f"user_bias has shape {tuple(user_bias.shape)}, expected ({user_factors.shape[0]},)")
    if item_bias.shape != (item_factors.shape[0],):
        raise ValueError(f"item_bias has shape {tuple(item_bias.shape)}, expected ({item_factors.shape[0]},)")
    if seen is not None:
        indptr, _ = seen
        if indptr.numel() != user_factors.shape[0] + 1:
            raise ValueError(f"seen indptr has {indptr.numel()} entries, expected {user_factors.shape[0] + 1}")


def _budget_bytes(device: torch.device, memory_budget: int | None) -> int:
    if memory_budget is not None:
        return max(int(memory_budget), 1 << 20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free * 0.6), 64 << 20)  # leave room for the caller and the allocator
    return DEFAULT_CPU_BUDGET


def tile_sizes(n_users: int, n_items: int, k: int, budget: int) -> tuple[int, int]:
    """(user block, item tile) with ``block * tile * BYTES_PER_CELL <= budget``.

    The whole catalogue is one tile when that still leaves a block of at least 256 users
    (fewer merges); otherwise tiles shrink, never below 4·k items so merging stays cheap.
    """
    cells = max(budget // BYTES_PER_CELL, 1)
    min_block = min(n_users, 256)
    tile = min(n_items, _MAX_ITEM_TILE)
    if tile * min_block > cells:
        tile = max(min(n_items, 4 * k, 1024), cells // max(min_block, 1))
        tile = min(tile, n_items)
    block = max(1, min(n_users, cells // max(tile, 1)))
    return block, tile


def device_dtype(dtype: str | None, device: torch.device | str) -> str:
    """The compute dtype to use for a *configured* ``dtype`` on ``device``: tf32 and bf16
    are tensor-core settings, so off CUDA they become float32 (bf16 GEMMs run ~3× slower
    than float32 on a CPU — 600k × 3k: 60 s vs 19 s on 2 cores — and tf32 does not exist
    there). An explicit request is the caller's to keep: ``fill_topk`` obeys any dtype."""
    mode = _compute_dtype(dtype)
    return mode if torch.device(device).type == "cuda" else "float32"


def _compute_dtype(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, str(dtype))
    if dtype not in ("float32", "tf32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: expected None, 'float32', 'tf32' or 'bfloat16'")
    return dtype


class _MatmulPrecision:
    """Sets the CUDA matmul FP32 precision (TF32 or IEEE) for the duration of a call and
    restores the previous setting afterwards.

    Uses ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (2.9+): reading
    the legacy ``allow_tf32`` flag raises once anything in the process used the new API
    (torch 2.13). The legacy flag only on a torch without it.
    """

    def __init__(self, device: torch.device, mode: str):
        self.on = device.type == "cuda"
        self.allow = mode == "tf32"
        self.new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")

    def __enter__(self):
        if self.on:
            m = torch.backends.cuda.matmul
            if self.new_api:
                self.prev = m.fp32_precision
                m.fp32_precision = "tf32" if self.allow else "ieee"
            else:  # pragma: no cover - torch < 2.9
                self.prev = m.allow_tf32
                m.allow_tf32 = self.allow
        return self

    def __exit__(self, *exc):
        if self.on:
            m = torch.backends.cuda.matmul
            if self.new_api:
                m.fp32_precision = self.prev
            else:  # pragma: no cover - torch < 2.9
                m.allow_tf32 = self.prev


def _augment(factors: Tensor, last: Tensor, dtype: str) -> Tensor:
    out = torch.cat([factors.to(torch.float32), last.to(torch.float32).reshape(-1, 1)], dim=1)
    return out.to(torch.bfloat16) if dtype == "bfloat16" else out


_MM_OUT_DTYPE: dict[str, bool] = {}
"""Per device type: whether ``torch.mm(..., out_dtype=torch.float32)`` takes bf16 inputs."""


def _scores(pu: Tensor, qi_t: Tensor, out: Tensor | None = None) -> Tensor:
    """[B, d+1] · [d+1, T] -> float32 [B, T]. bf16 inputs: their exact products summed in
    fp32, and the sums kept in fp32 — what the fused kernel computes. A bf16 *result* (plain
    ``pu @ qi_t``) would round the scores to 8 bits, which ties nearly every row's k-th and
    (k+1)-th score on a wide tile, and the tie rule's full-width redo of such rows made the
    torch tiles ~10× slower (32 users × 1M items, d = 128). ``out`` (CPU, float32): a flat
    buffer of at least B·T floats the product is written into (the same GEMM)."""
    if pu.dtype != torch.bfloat16:
        if out is not None and pu.device.type == "cpu":
            return torch.mm(pu, qi_t, out=out[: pu.shape[0] * qi_t.shape[1]].view(pu.shape[0], qi_t.shape[1]))
        return pu @ qi_t
    dev = pu.device.type
    if _MM_OUT_DTYPE.get(dev, dev == "cuda"):
        try:
            return torch.mm(pu, qi_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch, or no kernel
            _MM_OUT_DTYPE[dev] = False
    # bf16 values are exact in float32: the same products and fp32 sums, at fp32 speed
    return pu.to(torch.float32) @ qi_t.to(torch.float32)


def fill_topk(
    user_factors: Tensor,
    item_factors: Tensor,
    user_bias: Tensor,
    item_bias: Tensor,
    global_mean: float | Tensor,
    k: int,
    seen: CSR | None = None,
    *,
    item_offset: int = 0,
    dtype=None,
    memory_budget: int | None = None,
    user_block: int | None = None,
    item_tile: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k unseen items of every user, exact, ties to the lower item id.

    Args:
        user_factors: float32 [U, d]; item_factors float32 [I, d]; user_bias float32 [U];
            item_bias float32 [I]; all on one device (CPU or CUDA), which is where it runs.
        global_mean: μ (float or 0-d tensor), added with b_u to every score in float32.
        k: items per user (>= 1); more than I is allowed (the tail is padding).
        seen: CSR ``(indptr int64 [U+1], indices int32/int64 [nnz])`` of local item ids
            (0..I-1) to exclude per user, each row sorted ascending (as
            ``data.csr.build_csr`` makes them: the fused kernel walks a row in order); on
            any device. None = exclude nothing.
        item_offset: added to the returned item ids (an item shard reports global ids).
        dtype: None | "float32" | "tf32" | "bfloat16" compute (see the module docstring).
        memory_budget: bytes for score tiles; None = 60% of free CUDA memory, or 256 MiB
            on CPU.
        user_block, item_tile: explicit tile sizes (tests, tuning); None = from the budget.

    On CUDA (no explicit tile sizes) the fused Triton kernel
    (:mod:`svdfill.kernels.triton_fill`, same contract) is used where it is faster: with
    ``SVDFILL_FILL_KERNEL=auto`` (default) the first call per (device, d, k, dtype, seen or
    not) times both on a trial block of its first ``dispatch.AUTO_TRIAL_USERS`` users and
    keeps the faster (the tiles if the kernel fails or its scores disagree beyond
    ``dispatch.AUTO_TOLERANCE``: see :func:`svdfill.kernels.dispatch.kernel_choices`);
    ``torch`` / ``triton`` force one. The decision is :mod:`svdfill.kernels.dispatch`'s.

    Returns:
        ``(scores float32 [U, k], items int64 [U, k])`` on the input device, each row by
        score descending then item ascending; ``score = μ + b_u + b_i + p_u·q_i``. Where a
        user has fewer than k unseen items the tail holds item −1 and score −inf.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_inputs(user_factors, item_factors, user_bias, item_bias, seen)
    mode = _compute_dtype(dtype)
    device = user_factors.device
    n_users = user_factors.shape[0]
    opts = dict(item_offset=item_offset, dtype=dtype, memory_budget=memory_budget)

    # ---- dispatch point: fused Triton kernel on CUDA (svdfill.kernels.dispatch) ----
    if user_block is None and item_tile is None:
        def make_trial(n: int, fused):
            part = None if seen is None else csr_slice(seen[0], seen[1], 0, n)
            trial = (user_factors[:n], item_factors, user_bias[:n], item_bias, global_mean, k, part)

            def tiles():
                return _fill_tiles(*trial, mode=mode, item_offset=item_offset,
                                   memory_budget=memory_budget)

            def run_tiles():
                tiles()  # cuBLAS handles, first-use kernels, the allocator: not timed
                return dispatch.timed(tiles, device)

            def run_fused():
                fused(*trial, **opts)  # compiles the variant: not timed either
                return dispatch.timed(lambda: fused(*trial, **opts), device)

            return run_tiles, run_fused

        key = (str(device), user_factors.shape[1], k, mode, seen is not None)
        fused = dispatch.fill_kernel(device, key, n_users, mode, make_trial)
        if fused is not None:
            return fused(user_factors, item_factors, user_bias, item_bias, global_mean, k, seen, **opts)
    return _fill_tiles(user_factors, item_factors, user_bias, item_bias, global_mean, k, seen,
                       mode=mode, item_offset=item_offset, memory_budget=memory_budget,
                       user_block=user_block, item_tile=item_tile)


def _fill_tiles(user_factors, item_factors, user_bias, item_bias, global_mean, k, seen, *,
                mode: str, item_offset: int = 0, memory_budget: int | None = None,
                user_block: int | None = None, item_tile: int | None = None):
    """The torch-tile fill (any device): :func:`fill_topk`'s contract, inputs checked."""
    device = user_factors.device
    n_users, n_items = user_factors.shape[0], item_factors.shape[0]
    out_s = torch.full((n_users, k), float("-inf"), dtype=torch.float32, device=device)
    out_i = torch.full((n_users, k), -1, dtype=torch.int64, device=device)
    if n_users == 0 or n_items == 0:
        return out_s, out_i

    budget = _budget_bytes(device, memory_budget)
    auto_block, auto_tile = tile_sizes(n_users, n_items, k, budget)
    tile = max(1, min(item_tile or auto_tile, n_items))
    if user_block is None and item_tile is not None:
        auto_block = max(1, budget // BYTES_PER_CELL // tile)
    cpu = device.type == "cpu"
    if cpu and user_block is None:
        # cache-sized blocks: the score tile stays in L2 through the add, the mask and the
        # group maxima (each thread holds a share of the rows)
        auto_block = min(auto_block, max(2, CPU_BLOCK_CELLS // tile))
    block = max(1, min(user_block or auto_block, n_users))
    n_tiles = -(-n_items // tile)
    kk = min(k, n_items)
    # a one-row GEMM is a GEMV in MKL, whose sums may round differently: a last block of one
    # row starts a row early instead (the row computed twice, identically)
    starts = list(range(0, n_users, block))
    if len(starts) > 1 and n_users - starts[-1] == 1 and block > 1:
        starts[-1] -= 1

    qa = _augment(item_factors, item_bias, mode)  # [I, d+1]: [q_i, b_i]
    qa_t = [qa[lo : lo + tile].t() for lo in range(0, n_items, tile)]
    ones = torch.ones(block, device=device)
    # CPU: the GEMM writes into one reused buffer per tile width (no fresh pages per block)
    buf = torch.empty(block * tile, dtype=torch.float32) if cpu else None
    if seen is not None:
        indptr = seen[0].to("cpu", torch.int64)
        indices = seen[1]
        if cpu:  # numpy's repeat and fancy assignment: ~9× faster than torch's here
            indptr_np, indices_np = indptr.numpy(), indices.numpy()
    neg_inf = float("-inf")

    def run_block(u0: int, own: int, buf, pool) -> None:
        """Users u0..u0+block-1 (the rows from ``own`` on are written)."""
        u1 = min(u0 + block, n_users)
        pa = _augment(user_factors[u0:u1], ones[: u1 - u0], mode)
        # μ + b_u in float32 on every tile *before* the selection: the ranking (and the
        # tie rule) must see the scores that are reported. Added after it, two scores a
        # few ulps apart could round to one value and stay in the order of the unshifted
        # ones — not by item id, and unlike merge_topk over shards of the same users.
        shift = (user_bias[u0:u1].to(torch.float32) + float(global_mean)).unsqueeze(1)
        # the seen mask may go first only where −inf + shift is still −inf
        defer = cpu and n_tiles == 1 and kk < n_items and bool(torch.isfinite(shift).all())
        if seen is not None:
            a, b = int(indptr[u0]), int(indptr[u1])
            counts = (indptr[u0 + 1 : u1 + 1] - indptr[u0:u1]).to(device)
            if n_tiles == 1 and cpu:
                flat = np.repeat(np.arange(u1 - u0, dtype=np.int64) * n_items, np.diff(indptr_np[u0 : u1 + 1]))
                flat += indices_np[a:b]
            elif n_tiles == 1:
                # flat positions in the [B, I] tile: row·I + item, in two passes
                starts = torch.arange(u1 - u0, device=device, dtype=torch.int64).mul_(n_items)
                flat = torch.repeat_interleave(starts, counts, output_size=b - a)
                flat += indices[a:b].to(device)
            else:
                rows = torch.repeat_interleave(torch.arange(u1 - u0, device=device), counts, output_size=b - a)
                cols = indices[a:b].to(device=device, dtype=torch.int64)
                rows, cols, bounds = seen_by_tile(rows, cols, tile, n_tiles)
        best_s = best_i = None
        for t, i0 in enumerate(range(0, n_items, tile)):
            s = _scores(pa, qa_t[t], buf)  # [B, T]
            if not defer:  # deferred (CPU): added chunk by chunk in the selection, in cache
                s.add_(shift)
            width = s.shape[1]
            if seen is not None:
                if n_tiles == 1 and cpu and defer:
                    pass  # masked chunk by chunk in the selection (seen_at below)
                elif n_tiles == 1 and cpu:
                    s.numpy().reshape(-1)[flat] = neg_inf
                elif n_tiles == 1:
                    s.view(-1).index_fill_(0, flat, neg_inf)
                elif bounds[t + 1] > bounds[t]:
                    r, c = rows[bounds[t] : bounds[t + 1]], cols[bounds[t] : bounds[t + 1]]
                    s.view(-1).index_fill_(0, r * width + (c - i0), neg_inf)
            seen_at = (flat, indptr_np[u0 : u1 + 1] - a) if defer and seen is not None else None
            vals, idx = select_topk(s, kk, pool, shift if defer else None, seen_at)  # (score desc, item asc)
            if i0:
                idx = idx + i0
            if best_s is None:
                best_s, best_i = vals, idx
            else:
                # running ids are all lower than this tile's and both lists are ordered,
                # so one stable sort on the score keeps ties by item id
                cat_s = torch.cat([best_s, vals], 1)
                cat_i = torch.cat([best_i, idx], 1)
                cat_s, perm = torch.sort(cat_s, dim=1, descending=True, stable=True)
                best_s, best_i = cat_s[:, :kk], torch.gather(cat_i, 1, perm[:, :kk])
        dead = torch.isneginf(best_s)  # seen items: not recommendations
        # a shifted last block (see starts) writes only the rows it owns
        out_s[own:u1, :kk] = best_s[own - u0 :]
        out_i[own:u1, :kk] = torch.where(dead, -1, best_i + item_offset)[own - u0 :]

    workers = torch.get_num_threads() if cpu else 1
    if workers > 1 and len(starts) > 1:
        # CPU: one block per thread, end to end (GEMM, mask, selection), torch single-
        # threaded inside each: the block stays in that core's cache, and no OpenMP team
        # spins between the GEMM and the numpy selection (which doubled the CPU time)
        jobs = [(u0, max(u0, prev)) for u0, prev in zip(starts, [0] + [s + block for s in starts[:-1]])]

        def worker(j: int) -> None:
            wbuf = torch.empty(block * tile, dtype=torch.float32)
            with torch.no_grad():
                for u0, own in jobs[j::workers]:
                    run_block(u0, own, wbuf, None)

        # torch's thread count is process-wide: concurrent fills (a threaded Ray actor, a
        # caller's threads) take turns, so none restores a count another one set
        with _CPU_FILL_LOCK:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as ex:
                    list(ex.map(worker, range(workers)))
            finally:
                torch.set_num_threads(workers)
        return out_s, out_i
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    with torch.no_grad(), _MatmulPrecision(device, mode), _closing(pool):
        prev = 0
        for u0 in starts:
            run_block(u0, max(u0, prev), buf, pool)
            prev = u0 + block
    return out_s, out_i


@contextmanager
def _closing(pool):
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown()


def select_topk(s: Tensor, k: int, pool: ThreadPoolExecutor | None = None,
                shift: Tensor | None = None, seen_at=None) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of a score tile s float32 [B, T], ordered by (score desc,
    column asc): (values float32 [B, k'], columns int64 [B, k']), k' = min(k, T).

    ``shift`` float32 [B, 1] (CPU path only): added to ``s`` in place first, chunk by
    chunk, so that the add reads rows the selection then finds in cache (the same float32
    sums as ``s.add_(shift)``). ``seen_at`` (CPU, with ``shift``): ``(flat int64 [nnz],
    bounds int64 [B+1])``, the flat positions row·T + item of the seen pairs in row order
    and each row's range in them: set to −inf chunk by chunk before the add (−inf + a
    finite shift is −inf: the same tile as masking after it).

    CPU: :func:`svdfill.kernels.topk.threshold_topk` (numpy: a threshold from group maxima,
    one sort of the candidates), the rows split over ``pool``'s threads (numpy releases the
    GIL); CUDA, or k >= T: :func:`svdfill.kernels.topk.tile_topk`. Both are exact and give
    the same result.
    """
    rows, width = s.shape
    if s.device.type != "cpu" or k >= width or rows == 0:
        if seen_at is not None:
            s.view(-1)[torch.from_numpy(seen_at[0])] = float("-inf")
        if shift is not None:
            s.add_(shift)
        vals, cols = tile_topk(s, k)
        # a one-column tile comes back as itself: a view of the reused CPU score buffer
        return (vals.clone() if s.device.type == "cpu" else vals), cols
    a = s.contiguous().numpy()
    # chunks of rows small enough to stay in L2 between the passes over them
    step = max(CPU_SELECT_CELLS // width, 1)
    cuts = list(range(0, rows, step)) + [rows]
    add = None if shift is None else shift.reshape(rows, 1).numpy()

    def one(j: int):
        lo, hi = cuts[j], cuts[j + 1]
        chunk = a[lo:hi]
        if seen_at is not None:
            flat, bounds = seen_at
            chunk.reshape(-1)[flat[bounds[lo] : bounds[hi]] - lo * width] = -np.inf
        if add is not None:
            chunk += add[lo:hi]
        return threshold_topk(chunk, k)

    if pool is None or len(cuts) <= 2:
        parts = [one(j) for j in range(len(cuts) - 1)]
    else:
        parts = list(pool.map(one, range(len(cuts) - 1)))
    vals = np.concatenate([p[0] for p in parts])
    cols = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(vals), torch.from_numpy(cols)


def score_dense(
    user_factors: Tensor,
    item_factors: Tensor,
    user_bias: Tensor,
    item_bias: Tensor,
    global_mean: float | Tensor,
    *,
    dtype=None,
) -> Tensor:
    """Full scores ``μ + b_u + b_i + p_u·q_i`` of a user block: float32 [B, I].

    For the dense export (``svdfill fill --full``), called per user block; the caller sizes
    the block so that B × I fits.
    """
    mode = _compute_dtype(dtype)
    device = user_factors.device
    with torch.no_grad(), _MatmulPrecision(device, mode):
        pa = _augment(user_factors, torch.ones(user_factors.shape[0], device=device), mode)
        s = _scores(pa, _augment(item_factors, item_bias, mode).t())
        s += (user_bias.to(torch.float32) + float(global_mean)).unsqueeze(1)
    return s
