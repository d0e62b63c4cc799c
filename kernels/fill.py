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

Ties are broken by the lower item id, always. ``torch.topk`` orders a tied group
arbitrarily, so each tile asks it for k + 1 *sorted* values: a row whose k + 1 values have
no equal neighbours is exact as it stands; rows with a tie are redone on composite int64
keys (order-preserving bits of the float32 score, then the reversed column), which are
unique. Wide tiles first keep only the k + 1 groups of columns with the largest maxima
(see :func:`_tile_topk`), which cuts the top-k work about threefold on 3,000 items and
much more on 10^6. With float32 compute the result is therefore the exact ranking of the
float32 scores; whenever those are exact (e.g. dyadic inputs) it equals the float64
brute-force reference bit for bit. Tiles are merged with one stable sort (earlier tiles
hold lower ids), shards with :func:`merge_topk`.

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

import os
from typing import Sequence

import torch

Tensor = torch.Tensor
CSR = tuple[Tensor, Tensor]

DEFAULT_CPU_BUDGET = 256 * 2**20
"""Bytes of score tiles on CPU when no ``memory_budget`` is given."""

BYTES_PER_CELL = 16
"""Working bytes per (user, item) cell of a tile: the fp32 scores, the scatter/topk scratch
and, for tied rows, the int64 composite keys."""

_MAX_ITEM_TILE = 1 << 20


# ---------------------------------------------------------------------------------------
# ordering helpers: (score desc, item asc), -inf/-1 padding last
# ---------------------------------------------------------------------------------------

def _order_by_score_then_item(scores: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by item ascending; item −1 (padding) last.

    scores float32 [R, C], items int64 [R, C] -> both [R, C] reordered.
    """
    if scores.shape[1] <= 1:
        return scores, items
    if items.numel() == 0 or int(items.max()) < 0xFFFFFFFF:
        # one sort on unique composite keys: float order high, reversed item id low
        # (padding −1 becomes 0xFFFFFFFF, i.e. the lowest low word: last among equal scores)
        low = 0xFFFFFFFF - torch.where(items < 0, 0xFFFFFFFF, items)
        _, perm = torch.sort((_ordered_float_bits(scores) << 32) + low, dim=1, descending=True)
        return torch.gather(scores, 1, perm), torch.gather(items, 1, perm)
    key = torch.where(items < 0, torch.iinfo(torch.int64).max, items)
    key, perm = torch.sort(key, dim=1, stable=True)
    scores = torch.gather(scores, 1, perm)
    items = torch.gather(items, 1, perm)
    _, perm = torch.sort(scores, dim=1, descending=True, stable=True)
    return torch.gather(scores, 1, perm), torch.gather(items, 1, perm)


def _ordered_float_bits(x: Tensor) -> Tensor:
    """int64 keys that sort like the float32 values ``x`` (−0.0 folded onto +0.0)."""
    bits = (x + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0: they compare equal
    # negative floats order backwards: flip their magnitude bits (no shifts: slow on CPU)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def _exact_topk_cols(tile: Tensor, k: int, col_ids: Tensor | None = None) -> Tensor:
    """Positions of the k largest values per row, ties to the lower column: int64 [R, k].

    ``col_ids`` [R, n] (default: the position) are the column ids that break ties. Uses
    unique composite keys (float order in the high 32 bits, reversed column in the low 32
    bits), so ``topk`` has no choice left to make.
    """
    if col_ids is None:
        col_ids = torch.arange(tile.shape[1], device=tile.device, dtype=torch.int64)
    keys = (_ordered_float_bits(tile) << 32) + (0xFFFFFFFF - col_ids)
    _, idx = torch.topk(keys, k, dim=1, sorted=False)
    return idx


def _group_size(n: int, k: int) -> int:
    """Group width for the max-of-groups prefilter, or 0 when it would not pay off.

    Work ≈ n/4 (group maxima, one vectorized pass) + n/g (top-(k+1) of the maxima) +
    1.2·(k+1)·g (gather and top-k of the candidates), against n for a plain top-k."""
    best, best_cost = 0, 0.8 * n
    for g in (4, 8, 16, 32, 64, 128, 256):
        if n // g < k + 2:
            break
        cost = n / 4 + n / g + 1.2 * (k + 1) * g + n % g
        if cost < best_cost:
            best, best_cost = g, cost
    return best


def _exact_rows(tile: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Ordered exact top-k of every row of ``tile`` [R, n] (k <= n) on unique keys."""
    cols = _exact_topk_cols(tile, k)
    return _order_by_score_then_item(torch.gather(tile, 1, cols), cols)


def _tile_topk(tile: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``tile`` [R, T], ordered by (value desc, column asc):
    (values float32 [R, k'], columns int64 [R, k']) with k' = min(k, T).

    ``torch.topk`` orders a tied group arbitrarily and may cut it anywhere, so it is asked
    for k+1 sorted values: when no two neighbours among them are equal, the first k are
    the answer in the right order; rows with a tie (finite values only) are redone on
    unique (value, column) keys over the whole row (rare for real scores, common in the
    tie tests).

    Prefilter (wide rows): cut the row into G = T // g groups (group j = columns j, j+G,
    j+2G, …, so the maxima are one strided reduction) and keep the k+1 groups with the
    largest maxima; let τ be the smallest of those maxima. Every value > τ lies in a kept
    group, so the kept groups (plus the ragged tail) hold the row's top-k unless a value
    equal to τ in a dropped group could win a tie at the k-th place. That needs the k-th
    candidate to equal τ; but the k+1 kept maxima are all candidates >= τ, so then the
    (k+1)-th candidate equals τ too, and the boundary-tie check above redoes the row.
    """
    n = tile.shape[1]
    rows = tile.shape[0]
    if k >= n:
        cols = torch.arange(n, device=tile.device, dtype=torch.int64).expand(rows, n)
        return _order_by_score_then_item(tile, cols)
    g = _group_size(n, k) if rows else 0
    if g:
        G = n // g
        gmax = tile[:, : G * g].unflatten(1, (g, G)).amax(1)  # [R, G]
        _, gsel = torch.topk(gmax, k + 1, dim=1, sorted=False)
        offs = torch.arange(g, device=tile.device).mul_(G)
        cand_cols = (offs.view(1, g, 1) + gsel.unsqueeze(1)).flatten(1)  # [R, g·(k+1)]
        if G * g < n:
            tail = torch.arange(G * g, n, device=tile.device).expand(rows, n - G * g)
            cand_cols = torch.cat([cand_cols, tail], 1)
        vals, pos = torch.topk(torch.gather(tile, 1, cand_cols), k + 1, dim=1, sorted=True)
        cols = torch.gather(cand_cols, 1, pos)
    else:
        vals, cols = torch.topk(tile, k + 1, dim=1, sorted=True)
    # sorted by value; only equal neighbours can be out of item order or cut at the
    # boundary. -inf pairs give NaN here and are ignored: -inf entries become padding.
    redo = ((vals[:, :-1] - vals[:, 1:]) == 0).any(1).nonzero().flatten()
    vals, cols = vals[:, :k], cols[:, :k]
    if redo.numel():
        v2, c2 = _exact_rows(tile.index_select(0, redo), k)
        vals = vals.index_copy(0, redo, v2)
        cols = cols.index_copy(0, redo, c2)
    return vals, cols


# ---------------------------------------------------------------------------------------
# CSR helpers
# ---------------------------------------------------------------------------------------

def csr_rows(indptr: Tensor, indices: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(row within the block, column) int64 of every stored entry of rows ``[lo, hi)``."""
    a, b = int(indptr[lo]), int(indptr[hi])
    counts = (indptr[lo + 1 : hi + 1] - indptr[lo:hi]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(hi - lo, dtype=torch.int64, device=counts.device), counts)
    return rows, indices[a:b].to(torch.int64)


def csr_take(indptr: Tensor, indices: Tensor, rows: Tensor) -> CSR:
    """The CSR of the given rows, in the given order: (indptr int64 [len(rows)+1], indices)."""
    rows = rows.to(torch.int64)
    starts = indptr[rows].to(torch.int64)
    counts = indptr[rows + 1].to(torch.int64) - starts
    new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=new_ptr[1:])
    nnz = int(new_ptr[-1])
    # position of each output entry in the old indices: start of its row + offset within it
    row_of = torch.repeat_interleave(torch.arange(rows.numel()), counts)
    offs = torch.arange(nnz, dtype=torch.int64) - new_ptr[:-1][row_of]
    return new_ptr, indices[starts[row_of] + offs]


def csr_slice(indptr: Tensor, indices: Tensor, lo: int, hi: int) -> CSR:
    """The CSR of rows ``lo..hi-1`` (a contiguous block of users): indptr rebased to 0,
    indices a view; on the inputs' device."""
    a, b = int(indptr[lo]), int(indptr[hi])
    return indptr[lo : hi + 1] - a, indices[a:b]


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
    """Sets CUDA TF32 for the duration of a call, restoring it afterwards."""

    def __init__(self, device: torch.device, mode: str):
        self.on = device.type == "cuda"
        self.allow = mode == "tf32"

    def __enter__(self):
        if self.on:
            self.prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = self.allow
        return self

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = self.prev


def _augment(factors: Tensor, last: Tensor, dtype: str) -> Tensor:
    out = torch.cat([factors.to(torch.float32), last.to(torch.float32).reshape(-1, 1)], dim=1)
    return out.to(torch.bfloat16) if dtype == "bfloat16" else out


_MM_OUT_DTYPE: dict[str, bool] = {}
"""Per device type: whether ``torch.mm(..., out_dtype=torch.float32)`` takes bf16 inputs."""


def _scores(pu: Tensor, qi_t: Tensor) -> Tensor:
    """[B, d+1] · [d+1, T] -> float32 [B, T]. bf16 inputs: their exact products summed in
    fp32, and the sums kept in fp32 — what the fused kernel computes. A bf16 *result* (plain
    ``pu @ qi_t``) would round the scores to 8 bits, which ties nearly every row's k-th and
    (k+1)-th score on a wide tile, and the tie rule's full-width redo of such rows made the
    torch tiles ~10× slower (32 users × 1M items, d = 128)."""
    if pu.dtype != torch.bfloat16:
        return pu @ qi_t
    dev = pu.device.type
    if _MM_OUT_DTYPE.get(dev, dev == "cuda"):
        try:
            return torch.mm(pu, qi_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch, or no kernel
            _MM_OUT_DTYPE[dev] = False
    # bf16 values are exact in float32: the same products and fp32 sums, at fp32 speed
    return pu.to(torch.float32) @ qi_t.to(torch.float32)


def _seen_by_tile(rows: Tensor, cols: Tensor, tile: int, n_tiles: int):
    """Group a block's seen entries by item tile: (rows, cols, bounds) sorted by tile."""
    if n_tiles == 1:
        return rows, cols, [0, rows.numel()]
    t = cols // tile
    order = torch.argsort(t, stable=True)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(t, minlength=n_tiles)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    return rows, cols, bounds


def _triton_impl(device: torch.device):
    """The fused Triton fill for CUDA tensors unless ``SVDFILL_FILL_KERNEL=torch``, when
    importable; None otherwise (the torch tiles run)."""
    if device.type != "cuda" or _kernel_setting() == "torch":
        return None
    try:
        from svdfill.kernels.triton_fill import fill_topk_triton
        from svdfill.kernels.triton_util import triton_mode
    except ImportError:
        return None
    # no usable triton (absent, or too old to compile it right): the tiles, without a trial
    return fill_topk_triton if triton_mode(device) is not None else None


def _kernel_setting() -> str:
    """``SVDFILL_FILL_KERNEL``: auto (default) | torch | triton."""
    v = os.environ.get("SVDFILL_FILL_KERNEL", "auto").strip().lower() or "auto"
    if v not in ("auto", "torch", "triton"):
        raise ValueError(f"SVDFILL_FILL_KERNEL must be auto, torch or triton, got {v!r}")
    return v


AUTO_TRIAL_USERS = 8192
"""Users of the trial block on which ``auto`` times the fused kernel against the tiles."""
AUTO_MIN_USERS = 1024
"""Calls with fewer users take the torch tiles without a trial (nothing to win there)."""

_CHOICES: dict[tuple, dict] = {}


def kernel_choices() -> dict[tuple, dict]:
    """The ``auto`` decisions made in this process: ``{(device, d, k, mode, has_seen):
    {"kernel", "torch_s", "triton_s", "reason"}}`` (what ``svdfill bench`` and logs print)."""
    return dict(_CHOICES)


AUTO_TOLERANCE = {"float32": 1e-5, "tf32": 2.0**-9, "bfloat16": 2.0**-6}
"""How far (relative to the largest |score|) the two kernels' score lists may differ on the
trial: the fp32 accumulation orders differ, and with bf16 the tiles round the GEMM output to
bf16 while the fused kernel keeps fp32. A wrong mask, bias or row is off by far more."""


def _pick_kernel(key: tuple, trial: int, run_tiles, run_fused, *, rel_tol: float) -> str:
    """``auto``: time the fused kernel against the torch tiles once per ``key`` on a trial
    block and keep the faster; if the fused one fails or disagrees, the tiles.

    ``run_tiles()`` / ``run_fused()`` ``-> ((scores, items), seconds)`` run each on the
    trial block. An error of the tiles propagates (they are the answer either way); one of
    the fused kernel only rules it out. The two agree when their -inf (padding) positions
    are equal and their score lists (each sorted descending, so order statistics) are
    within ``rel_tol`` of the largest |score|; items may trade places at near-ties, as the
    module docstring allows.
    """
    import warnings

    got = _CHOICES.get(key)
    if got is not None:
        return got["kernel"]
    (t_s, _), torch_s = run_tiles()
    try:
        (f_s, _), fused_s = run_fused()
    except Exception as e:  # a compile or launch failure: the tiles still give the answer
        first = str(e).splitlines()[0][:200] if str(e) else ""
        warnings.warn(f"svdfill fill: the fused Triton fill failed its trial ({type(e).__name__}: "
                      f"{first}); using the torch tiles")
        _CHOICES[key] = {"kernel": "torch", "torch_s": torch_s, "triton_s": None,
                         "reason": f"fused failed: {type(e).__name__}"}
        return "torch"
    fin = torch.isfinite(t_s)
    scale = max(1.0, float(t_s[fin].abs().max())) if bool(fin.any()) else 1.0
    agree = torch.equal(torch.isneginf(t_s), torch.isneginf(f_s)) and bool(
        ((t_s - f_s)[fin].abs() <= rel_tol * scale).all())
    if not agree:
        warnings.warn("svdfill fill: the fused Triton fill disagreed with the torch tiles on its "
                      "trial block; using the torch tiles")
        choice, reason = "torch", "fused disagreed"
    else:
        choice = "triton" if fused_s < torch_s else "torch"
        reason = f"faster on a {trial}-user trial"
    _CHOICES[key] = {"kernel": choice, "torch_s": torch_s, "triton_s": fused_s, "reason": reason}
    return choice


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    import time

    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


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
    not) times both on a trial block of its first :data:`AUTO_TRIAL_USERS` users and keeps
    the faster (the tiles if the kernel fails or its scores disagree beyond
    :data:`AUTO_TOLERANCE`: see :func:`kernel_choices`); ``torch`` / ``triton`` force one.

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

    # ---- dispatch point: fused Triton kernel on CUDA (svdfill.kernels.triton_fill) ----
    if user_block is None and item_tile is None:
        fused = _triton_impl(device)
        setting = _kernel_setting() if fused is not None else "torch"
        if setting == "auto" and n_users >= AUTO_MIN_USERS:
            key = (str(device), user_factors.shape[1], k, mode, seen is not None)
            n = min(n_users, AUTO_TRIAL_USERS)
            part = None if seen is None else csr_slice(seen[0], seen[1], 0, n)

            trial = (user_factors[:n], item_factors, user_bias[:n], item_bias, global_mean, k, part)

            def tiles():
                return _fill_tiles(*trial, mode=mode, item_offset=item_offset,
                                   memory_budget=memory_budget)

            def run_tiles():
                tiles()  # cuBLAS handles, first-use kernels, the allocator: not timed
                return _timed(tiles, device)

            def run_fused():
                fused(*trial, **opts)  # compiles the variant: not timed either
                return _timed(lambda: fused(*trial, **opts), device)

            setting = _pick_kernel(key, n, run_tiles, run_fused, rel_tol=AUTO_TOLERANCE[mode])
        if setting == "triton":
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
    block = max(1, min(user_block or auto_block, n_users))
    n_tiles = -(-n_items // tile)
    kk = min(k, n_items)

    qa = _augment(item_factors, item_bias, mode)  # [I, d+1]: [q_i, b_i]
    qa_t = [qa[lo : lo + tile].t() for lo in range(0, n_items, tile)]
    ones = torch.ones(block, device=device)
    if seen is not None:
        indptr = seen[0].to("cpu", torch.int64)
        indices = seen[1]
    neg_inf = float("-inf")

    with torch.no_grad(), _MatmulPrecision(device, mode):
        for u0 in range(0, n_users, block):
            u1 = min(u0 + block, n_users)
            pa = _augment(user_factors[u0:u1], ones[: u1 - u0], mode)
            # μ + b_u in float32 on every tile *before* the selection: the ranking (and the
            # tie rule) must see the scores that are reported. Added after it, two scores a
            # few ulps apart could round to one value and stay in the order of the unshifted
            # ones — not by item id, and unlike merge_topk over shards of the same users.
            shift = (user_bias[u0:u1].to(torch.float32) + float(global_mean)).unsqueeze(1)
            if seen is not None:
                a, b = int(indptr[u0]), int(indptr[u1])
                counts = (indptr[u0 + 1 : u1 + 1] - indptr[u0:u1]).to(device)
                if n_tiles == 1:
                    # flat positions in the [B, I] tile: row·I + item, in two passes
                    starts = torch.arange(u1 - u0, device=device, dtype=torch.int64).mul_(n_items)
                    flat = torch.repeat_interleave(starts, counts, output_size=b - a)
                    flat += indices[a:b].to(device)
                else:
                    rows = torch.repeat_interleave(torch.arange(u1 - u0, device=device), counts, output_size=b - a)
                    cols = indices[a:b].to(device=device, dtype=torch.int64)
                    rows, cols, bounds = _seen_by_tile(rows, cols, tile, n_tiles)
            best_s = best_i = None
            for t, i0 in enumerate(range(0, n_items, tile)):
                s = _scores(pa, qa_t[t]).add_(shift)  # [B, T]
                width = s.shape[1]
                if seen is not None:
                    if n_tiles == 1:
                        s.view(-1).index_fill_(0, flat, neg_inf)
                    elif bounds[t + 1] > bounds[t]:
                        r, c = rows[bounds[t] : bounds[t + 1]], cols[bounds[t] : bounds[t + 1]]
                        s.view(-1).index_fill_(0, r * width + (c - i0), neg_inf)
                vals, idx = _tile_topk(s, kk)  # ordered by (score desc, item asc)
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
            out_s[u0:u1, :kk] = best_s
            out_i[u0:u1, :kk] = torch.where(dead, -1, best_i + item_offset)
    return out_s, out_i


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], k: int | None = None) -> tuple[Tensor, Tensor]:
    """Merge per-shard top-k lists of the same users into one: (scores [U, k], items [U, k]).

    Each part is ``(scores float32 [U, k_p], items int64 [U, k_p])`` (e.g. ``fill_topk`` on
    one item shard with its ``item_offset``); k defaults to the largest k_p. Order: score
    descending, ties by lower item id, padding (item −1, −inf) last — the rule of
    :func:`fill_topk`, so merging shards equals filling the whole catalogue.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one (scores, items) pair")
    k = max(p[0].shape[1] for p in parts) if k is None else k
    scores = torch.cat([p[0].to(torch.float32) for p in parts], 1)
    items = torch.cat([p[1].to(torch.int64) for p in parts], 1)
    items = torch.where(torch.isneginf(scores), -1, items)
    scores, items = _order_by_score_then_item(scores, items)
    n = scores.shape[1]
    if n >= k:
        return scores[:, :k].contiguous(), items[:, :k].contiguous()
    pad = k - n
    return (torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1),
            torch.cat([items, items.new_full((items.shape[0], pad), -1)], 1))


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
