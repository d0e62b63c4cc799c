"""Fused fill: score GEMM + item bias + seen mask + top-k candidate selection in one kernel.

Same API and tie rule as :func:`svdfill.kernels.fill.fill_topk`; the [U, I] score matrix is
never written to device memory.

Design (why it is exact)
------------------------
The kernel never sorts. Each program takes ``BLOCK_U`` users × a chunk of items and walks
the chunk in tiles of ``BLOCK_I`` items:

1. ``S = P_B · Q_Tᵀ`` on the tensor cores (``tl.dot``; float32 inputs with IEEE precision,
   tf32, or bf16 inputs; float32 accumulation), ``+ b_i``, then ``+ (μ + b_u)`` (so every
   comparison below is on the reported score); item columns past the chunk and the user's
   seen items (walked from the CSR with one cursor per row, rows sorted) → −inf.
2. A per-row **lower bound** ``t`` on the user's k-th best unseen score: the program keeps
   ``M[row, j]`` = max score so far in tile column ``j``. Columns hold distinct items, so
   the k-th largest entry of a row of ``M`` is reached by ≥ k distinct unseen items and is
   ≤ the k-th best (found exactly by a 32-step bisection on order-preserving int32 keys at
   tiles 1, 2, 4, 8… and every 16th; in between the row minimum, valid since
   ``BLOCK_I ≥ k``). Bounds are shared between the programs working on the same users (one
   float ``atomic_max`` per row and tile). For ``k > BLOCK_I`` there is no bound: every
   unseen item is a candidate (correct, just not fast).
3. Every score ``≥ t`` (ties included) is a *candidate*: packed with its item id into one
   int64 key (order-preserving score bits ≪ 32 | ~item, so a larger key is a higher score
   or, on a tie, the lower item id) and appended to the row's candidate list (one atomic
   per row and tile reserves the slots, a prefix sum over the row places the keys). Scores
   below ``t`` cannot be in the top-k and cost nothing more.

A second, small pass (torch) takes the top-k keys of each row's candidate list and decodes
them; since every item whose score is ≥ the k-th best is a candidate, and the keys order
exactly by (score desc, item asc), the result is the exact top-k under the tie rule for the
scores the kernel computed. A row whose list overflowed its capacity is re-run with its
final bound as the starting bound and a list as long as its first count: the final bound
only admits a subset of what was emitted the first time, so the re-run cannot overflow.

Per score the epilogue is a handful of register ops (bias add, mask, max, compare); the only
memory traffic beyond reading P and Q is the candidate lists (~2,000 8-byte keys per user
for k=100 over 1M random-score items, against the 4 MB row of scores torch writes and
reads back).

Scores returned are ``(p_u·q_i + b_i) + (μ + b_u)`` in float32; float32 inputs with the
default precision give the same top-k as a float64 reference wherever the float32 scores
are not closer than their rounding (exactly so on inputs where float32 arithmetic is exact).
With ``dtype=torch.bfloat16`` the factors are rounded to bf16 first (products exact,
float32 accumulation): scores are within ~1e-2 relative of float64 and the top-k set may
differ only between items whose float64 scores are that close.

On CPU tensors without ``TRITON_INTERPRET=1`` (or without triton) the call raises
RuntimeError saying why: :func:`svdfill.kernels.fill.fill_topk` is the entry point that
falls back (:mod:`svdfill.kernels.dispatch` decides), and this module imports neither.
"""

from __future__ import annotations

import math
import sys

import torch

from svdfill.kernels.triton_util import launch, next_pow2, triton_mode, unavailable_reason

try:  # the kernel body needs `tl` as a global; without triton it is never built
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    tl = None

_KEY_EMPTY = torch.iinfo(torch.int64).min


def _fill_kernel(
    P, Q, IB, SH, rows_ptr, n_rows, n_items, d, stride_p, stride_q,
    indptr_ptr, seen_ptr, seen_base,
    thr_ptr, cnt_ptr, buf_ptr, cap, chunk_len, k,
    BLOCK_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr, HAS_SEEN: tl.constexpr, USE_BOUND: tl.constexpr,
    SELECT_EVERY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_u = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    rm = r < n_rows
    r64 = r.to(tl.int64)
    user = tl.load(rows_ptr + r64, mask=rm, other=0).to(tl.int64)
    c0 = pid_c * chunk_len
    c1 = tl.minimum(c0 + chunk_len, n_items)
    # rows past the end get +inf: nothing passes the bound, nothing is written for them
    thr = tl.load(thr_ptr + r64, mask=rm, other=float("inf"))
    # μ + b_u, added before any comparison: the selection sees the reported scores
    sh = tl.load(SH + user, mask=rm, other=0.0)
    best = tl.full([BLOCK_U, BLOCK_I], float("-inf"), tl.float32)
    cols0 = tl.arange(0, BLOCK_I)
    if HAS_SEEN:
        # seen item g of a row maps to local column g - seen_base; rows are sorted, so one
        # cursor per row walks them along with the tiles; 2**62 = "no more seen items"
        sp = tl.load(indptr_ptr + user, mask=rm, other=0)
        se = tl.load(indptr_ptr + user + 1, mask=rm, other=0)
        nxt = tl.load(seen_ptr + sp, mask=sp < se, other=0).to(tl.int64) - seen_base
        nxt = tl.where(sp < se, nxt, 4611686018427387904)
        while tl.max((nxt < c0).to(tl.int32), axis=0) > 0:
            adv = nxt < c0
            sp = sp + adv.to(tl.int64)
            nxt_new = tl.load(seen_ptr + sp, mask=sp < se, other=0).to(tl.int64) - seen_base
            nxt = tl.where(adv, tl.where(sp < se, nxt_new, 4611686018427387904), nxt)
    for t0 in range(c0, c1, BLOCK_I):
        cols = t0 + cols0
        cm = cols < c1
        acc = tl.zeros([BLOCK_U, BLOCK_I], dtype=tl.float32)
        for kt in tl.static_range(K_TILES):
            kc = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:  # d a multiple of BLOCK_K: row-constant masks keep 16-byte loads
                km = kc < K_TILES * BLOCK_K
            else:
                km = kc < d
            p = tl.load(P + user[:, None] * stride_p + kc[None, :],
                        mask=rm[:, None] & km[None, :], other=0.0)
            q = tl.load(Q + cols[:, None].to(tl.int64) * stride_q + kc[None, :],
                        mask=cm[:, None] & km[None, :], other=0.0)
            if UPCAST:  # Triton's interpreter has no bf16 matmul; bf16 products are exact in fp32
                p = p.to(tl.float32)
                q = q.to(tl.float32)
            acc = tl.dot(p, tl.trans(q), acc, input_precision=PRECISION)
        ib = tl.load(IB + cols, mask=cm, other=0.0)
        # + 0.0 turns -0.0 into +0.0 so equal scores pack to equal keys
        s = tl.where(cm[None, :], (acc + ib[None, :]) + sh[:, None] + 0.0, float("-inf"))
        if HAS_SEEN:
            t1 = t0 + BLOCK_I
            while tl.max((nxt < t1).to(tl.int32), axis=0) > 0:
                hit = nxt < t1
                # compare in int32 tile coordinates (a [BU, BI] int64 tensor costs registers)
                rel = tl.where(hit, nxt - t0, BLOCK_I).to(tl.int32)
                s = tl.where(cols0[None, :] == rel[:, None], float("-inf"), s)
                sp = sp + hit.to(tl.int64)
                nxt_new = tl.load(seen_ptr + sp, mask=sp < se, other=0).to(tl.int64) - seen_base
                nxt = tl.where(hit, tl.where(sp < se, nxt_new, 4611686018427387904), nxt)
        cand = (s >= thr[:, None]) & (s > float("-inf"))
        if tl.max(tl.max(cand.to(tl.int32), axis=1), axis=0) > 0:
            # one atomic per row reserves the row's slots; a prefix sum places each key
            c = cand.to(tl.int32)
            n_new = tl.sum(c, axis=1)
            base = tl.atomic_add(cnt_ptr + r64, n_new, mask=rm & (n_new > 0), sem="relaxed")
            pos = base[:, None] + tl.cumsum(c, axis=1) - c
            bits = s.to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            ok = cand & (pos < cap)
            # the int64 key (ordered << 32) | (2^32 - 1 - item), written as its two int32
            # halves (little-endian: low word first) so no [BU, BI] int64 lives in registers
            slot = buf_ptr + (r64[:, None] * cap + pos) * 2
            tl.store(slot, ~cols[None, :], mask=ok)
            tl.store(slot + 1, ordered, mask=ok)
        if USE_BOUND:
            best = tl.maximum(best, s)
            ti = (t0 - c0) // BLOCK_I + 1
            if ((ti & (ti - 1)) == 0) | (ti % SELECT_EVERY == 0):
                # the k-th largest column maximum: k distinct items score at least this much.
                # Found exactly by bisection on order-preserving int32 keys (32 counting
                # passes per row; cheaper than a sort and fast under the interpreter too),
                # so only at tiles 1, 2, 4, 8… and every SELECT_EVERY-th.
                ob = best.to(tl.int32, bitcast=True)
                ob = ob ^ ((ob >> 31) & 0x7FFFFFFF)
                lo = tl.full([BLOCK_U], -2147483648, tl.int64)  # count(ob ≥ lo) = BLOCK_I ≥ k
                hi = tl.full([BLOCK_U], 2147483648, tl.int64)  # count(ob ≥ hi) = 0 < k
                for _ in range(32):
                    mid = (lo + hi) >> 1
                    n_ge = tl.sum((ob >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
                    lo = tl.where(n_ge >= k, mid, lo)
                    hi = tl.where(n_ge >= k, hi, mid)
                v = lo.to(tl.int32)
                lb = (v ^ ((v >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            else:
                lb = tl.min(best, axis=1)  # BLOCK_I ≥ k distinct items: a weaker bound
            thr = tl.maximum(thr, lb)
            shared = tl.atomic_max(thr_ptr + r64, thr, mask=rm, sem="relaxed")
            thr = tl.where(rm, tl.maximum(thr, shared), thr)


def check_rerun(counts: torch.Tensor, capacity: int) -> None:
    """The re-run of overflowing rows must fit: a re-run starts from each row's final bound,
    which admits a subset of what the first launch emitted, so its count is at most the
    first one (= ``capacity``). A larger count means the two launches did not compute the
    same scores, and keys past ``capacity`` were dropped: raise instead of returning a
    top-k that may miss candidates."""
    worst = int(counts.max()) if counts.numel() else 0
    if worst > capacity:
        raise RuntimeError(
            f"fill_topk_triton: a re-run emitted {worst} candidates for a row with room for "
            f"{capacity} (the first launch counted at most {capacity}); the two launches "
            "disagree, so the result could miss items. Run the torch fill "
            "(SVDFILL_FILL_KERNEL=torch) and report this.")


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys → (float32 scores, int64 local item ids); empty keys → (−inf, −1)."""
    empty = keys == _KEY_EMPTY
    item = 4294967295 - (keys & 0xFFFFFFFF)
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    scores = scores.masked_fill(empty, float("-inf"))
    item = item.masked_fill(empty, -1)
    return scores, item


def _precision(dtype) -> tuple[torch.dtype, str]:
    """(storage dtype of the factors, tl.dot input precision) for the ``dtype`` argument."""
    if dtype is None or dtype in ("float32", "fp32", "ieee", torch.float32):
        return torch.float32, "ieee"
    if dtype in ("tf32", "tensorfloat32"):
        return torch.float32, "tf32"
    if dtype in ("bfloat16", "bf16", torch.bfloat16):
        return torch.bfloat16, "ieee"
    raise ValueError(f"fill_topk_triton: dtype must be float32, tf32 or bfloat16, got {dtype!r}")


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(64 << 20, min(free // 4, 8 << 30))
    return 64 << 20


def _default_chunks(n_user_blocks: int, n_items: int, block_i: int, device: torch.device) -> int:
    """Item chunks per user block: enough programs to fill the device, none empty."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(4 * sms / max(1, n_user_blocks))
    return max(1, min(want, math.ceil(n_items / block_i)))


def _default_capacity(k: int, n_items: int, block_i: int, use_bound: bool) -> int:
    """Candidate slots per row. Exactness never depends on it (overflowing rows are re-run);
    it trades memory against re-runs. With the bound, a row emits about
    BLOCK_I + 2.5·k·ln(tiles) keys on random scores (simulated: ~2,000 for k=100 over 1M
    items; ~800 over 3,706); without it, every unseen item."""
    if not use_bound:
        return n_items
    tiles = max(1, math.ceil(n_items / block_i))
    est = 1.25 * (block_i + 2.5 * k * math.log(tiles + 1))
    return int(min(n_items, max(2 * k, 64, est)))


def launch_config(k: int, d: int, *, precision: str = "ieee", wide: bool = False,
                  compiled: bool = True, block_u: int | None = None, block_i: int | None = None,
                  num_warps: int | None = None) -> dict:
    """Tile shape and constexprs of the fill kernel for top-``k`` at factor dimension ``d``.

    ``precision`` is the ``tl.dot`` input precision and ``wide`` whether the factors are
    float32 (else bf16). ``BLOCK_I ≥ k`` keeps the lower bound (k ≤ 256 by default); bigger
    k runs unbounded. Defaults come from ahead-of-time sm_90 compiles
    (:func:`svdfill.kernels.triton_util.compile_report`, no GPU timing yet): the epilogue
    keeps ~4 [BLOCK_U, BLOCK_I] tensors live, so 64×128 with 8 warps and 32-wide K steps
    spills least while still issuing wgmma (bf16 72 B, tf32 136 B of stack); the IEEE
    float32 dot runs on FMA units and wants 32×128, 16-wide K steps (8 B of stack); for
    k > 128 (256-wide tiles) 32 rows (mma.sync, 112 B bf16) beat 64 (1,200 B).
    Interpreted runs use 16-user blocks (cheaper per program in numpy).
    """
    ieee_fp32 = wide and precision == "ieee"
    if block_i is None:
        block_i = 128 if k <= 128 else 256
    if block_u is None:
        # wgmma wants 64-row tiles; 256-wide tiles (k > 128) only fit registers at 32 rows
        block_u = (32 if ieee_fp32 or block_i > 128 else 64) if compiled else 16
    for name, v in (("block_u", block_u), ("block_i", block_i)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"fill_topk_triton: {name} must be a power of two ≥ 16, got {v}")
    if num_warps is None:
        num_warps = 8 if block_u * block_i >= 4096 else 4
    block_k = min(16 if ieee_fp32 else 32, max(16, next_pow2(d)))
    return {"BLOCK_U": block_u, "BLOCK_I": block_i, "BLOCK_K": block_k,
            "K_TILES": math.ceil(d / block_k), "EVEN_K": d % block_k == 0,
            "USE_BOUND": k <= block_i, "SELECT_EVERY": 16, "num_warps": num_warps}


def compile_specs(k: int = 100, d: int = 128, **tiles) -> list[tuple[str, dict, dict, int]]:
    """(label, signature, constexprs, num_warps) of the CUDA variants for top-``k`` at ``d``
    (bf16 and float32 inputs, with seen exclusion) — for
    :func:`svdfill.kernels.triton_util.compile_report`."""
    out = []
    for label, elt, precision in (("bf16", "*bf16", "ieee"), ("tf32", "*fp32", "tf32"),
                                  ("fp32", "*fp32", "ieee")):
        cfg = launch_config(k, d, precision=precision, wide=elt == "*fp32", **tiles)
        num_warps = cfg.pop("num_warps")
        sig = {"P": elt, "Q": elt, "IB": "*fp32", "SH": "*fp32", "rows_ptr": "*i64", "n_rows": "i32",
               "n_items": "i32", "d": "i32", "stride_p": "i32", "stride_q": "i32",
               "indptr_ptr": "*i64", "seen_ptr": "*i32", "seen_base": "i32", "thr_ptr": "*fp32",
               "cnt_ptr": "*i32", "buf_ptr": "*i32", "cap": "i32", "chunk_len": "i32", "k": "i32"}
        const = dict(cfg, HAS_SEEN=True, PRECISION=precision, UPCAST=False)
        out.append((f"fill k={k} d={d} {label} {cfg['BLOCK_U']}x{cfg['BLOCK_I']} "
                    f"w{num_warps}", sig, const, num_warps))
    return out


def fill_topk_triton(
    user_factors: torch.Tensor,
    item_factors: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    global_mean: float | torch.Tensor,
    k: int,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    item_offset: int = 0,
    dtype=None,
    memory_budget: int | None = None,
    block_u: int | None = None,
    block_i: int | None = None,
    n_chunks: int | None = None,
    seen_base: int = 0,
    capacity: int | None = None,
    num_warps: int | None = None,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-user top-k of ``μ + b_u + b_i + p_u·q_i`` over unseen items, fused.

    Args:
        user_factors: float32 ``[U, d]``; item_factors: float32 ``[I, d]`` (same device).
        user_bias: float32 ``[U]``; item_bias: float32 ``[I]``; global_mean: μ (float).
        k: items per user (≥ 1; k > I pads with −1 / −inf).
        seen: CSR ``(indptr int64 [U+1], indices int32/int64 [nnz])``, rows sorted ascending,
            of items to exclude; an entry ``g`` excludes local item ``g - seen_base``
            (entries outside ``[0, I)`` after the shift are ignored).
        item_offset: added to the returned item ids (global ids for an item shard).
        dtype: None/"float32" (IEEE float32 dot), "tf32", or "bfloat16"/torch.bfloat16.
        memory_budget: bytes for one launch's candidate lists (users per launch follow).
        block_u, block_i, n_chunks, num_warps: tile shape, item chunks per user block and
            warps per program (powers of two; defaults from :func:`launch_config`). Results
            do not depend on them.
        seen_base: see ``seen``.
        capacity: candidate slots per row in the first launch (default from k, I and the
            tile); rows that overflow are re-run exactly, so only speed depends on it.
        stats: if a dict is given, it receives ``launches``, ``rerun_rows``,
            ``candidates`` (total keys emitted) and ``capacity``.

    Returns:
        ``scores`` float32 ``[U, k]`` descending and ``items`` int64 ``[U, k]`` (local id +
        ``item_offset``); ties → lower item id; missing → item −1, score −inf.
    """
    device = user_factors.device
    if triton_mode(device) is None:
        # no fallback here: which fill runs is svdfill.kernels.dispatch's decision, and
        # svdfill.kernels.fill.fill_topk (the one entry point) takes the torch tiles there
        raise RuntimeError(f"fill_topk_triton: {unavailable_reason(device)}; "
                           "svdfill.kernels.fill.fill_topk runs the torch tiles instead")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"fill_topk_triton: k must be a positive int, got {k!r}")
    if user_factors.dim() != 2 or item_factors.dim() != 2 \
            or user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError("fill_topk_triton: factors must be [U, d] and [I, d] with the same d, got "
                         f"{tuple(user_factors.shape)} and {tuple(item_factors.shape)}")
    n_users, d = user_factors.shape
    n_items = item_factors.shape[0]
    if user_bias.shape != (n_users,) or item_bias.shape != (n_items,):
        raise ValueError("fill_topk_triton: biases must be [U] and [I]")
    for name, t in (("item_factors", item_factors), ("user_bias", user_bias),
                    ("item_bias", item_bias)):
        if t.device != device:
            raise ValueError(f"fill_topk_triton: {name} is on {t.device}, user_factors on {device}")
    store_dtype, precision = _precision(dtype)
    mode = triton_mode(device)
    if sys.byteorder != "little":  # the kernel writes int64 keys as two int32 halves
        raise RuntimeError("fill_topk_triton needs a little-endian host")

    out_scores = torch.full((n_users, k), float("-inf"), dtype=torch.float32, device=device)
    out_items = torch.full((n_users, k), -1, dtype=torch.int64, device=device)
    if n_users == 0 or n_items == 0:
        return out_scores, out_items

    P = user_factors.detach().to(store_dtype).contiguous()
    Q = item_factors.detach().to(store_dtype).contiguous()
    IB = item_bias.detach().to(torch.float32).contiguous()
    row_shift = (user_bias.detach().to(torch.float32) + float(global_mean)).contiguous()
    if seen is not None:
        indptr, indices = seen
        if indptr.shape != (n_users + 1,):
            raise ValueError(f"fill_topk_triton: seen indptr must be [U+1] = [{n_users + 1}], "
                             f"got {tuple(indptr.shape)}")
        indptr = indptr.to(device=device, dtype=torch.int64).contiguous()
        indices = indices.to(device=device).contiguous()
        if indices.numel() == 0:  # a valid pointer for the kernel; never read
            indices = torch.zeros(1, dtype=torch.int32, device=device)
    else:
        indptr = torch.zeros(1, dtype=torch.int64, device=device)
        indices = torch.zeros(1, dtype=torch.int32, device=device)

    cfg = launch_config(k, d, precision=precision, wide=store_dtype == torch.float32,
                        compiled=(mode == "compiled"), block_u=block_u, block_i=block_i,
                        num_warps=num_warps)
    block_u, block_i, use_bound = cfg["BLOCK_U"], cfg["BLOCK_I"], cfg["USE_BOUND"]
    cap = _default_capacity(k, n_items, block_i, use_bound)
    if capacity is not None:
        if capacity < 1:
            raise ValueError(f"fill_topk_triton: capacity must be ≥ 1, got {capacity}")
        cap = int(capacity)
    budget = memory_budget if memory_budget else _default_budget(device)
    rows_per_launch = max(block_u, (budget // (cap * 8 + 16)) // block_u * block_u)
    upcast = mode == "interpret" and store_dtype != torch.float32
    kk = min(k, n_items)
    info = {"launches": 0, "rerun_rows": 0, "candidates": 0, "capacity": cap}

    def run(rows: torch.Tensor, thr: torch.Tensor, capacity: int):
        """One launch over ``rows``; returns (counts, keys)."""
        n = rows.shape[0]
        cnt = torch.zeros(n, dtype=torch.int32, device=device)
        buf = torch.full((n, capacity), _KEY_EMPTY, dtype=torch.int64, device=device)
        ublocks = math.ceil(n / block_u)
        chunks = n_chunks or _default_chunks(ublocks, n_items, block_i, device)
        chunk_len = math.ceil(math.ceil(n_items / chunks) / block_i) * block_i
        chunks = math.ceil(n_items / chunk_len)
        launch(
            _fill_kernel, device, (ublocks, chunks),
            P, Q, IB, row_shift, rows, n, n_items, d, P.stride(0), Q.stride(0),
            indptr, indices, int(seen_base),
            thr, cnt, buf.view(torch.int32), capacity, chunk_len, min(k, block_i),
            BLOCK_U=block_u, BLOCK_I=block_i, BLOCK_K=cfg["BLOCK_K"], K_TILES=cfg["K_TILES"],
            EVEN_K=cfg["EVEN_K"],
            HAS_SEEN=seen is not None, USE_BOUND=use_bound, SELECT_EVERY=cfg["SELECT_EVERY"],
            PRECISION=precision, UPCAST=upcast, num_warps=cfg["num_warps"],
        )
        info["launches"] += 1
        return cnt, buf

    def select(rows: torch.Tensor, buf: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        top = torch.topk(buf, min(kk, buf.shape[1]), dim=1).values
        scores, items = _decode(top)
        valid = items >= 0
        items = torch.where(valid, items + item_offset, items)
        out_scores[rows, : scores.shape[1]] = scores
        out_items[rows, : items.shape[1]] = items

    all_rows = torch.arange(n_users, dtype=torch.int64, device=device)
    for lo in range(0, n_users, rows_per_launch):
        rows = all_rows[lo: lo + rows_per_launch]
        thr = torch.full((rows.shape[0],), float("-inf"), dtype=torch.float32, device=device)
        cnt, buf = run(rows, thr, cap)
        info["candidates"] += int(cnt.sum())
        over = cnt > cap
        if bool(over.any()):
            # rerun with the final bound (admits a subset of the first emission, so the
            # first count is enough room), in launches that fit the budget
            o_rows, o_thr, o_cnt = rows[over], thr[over], cnt[over]
            ok = ~over
            select(rows[ok], buf[ok])
            del buf
            order = torch.argsort(o_cnt)
            o_rows, o_thr, o_cnt = o_rows[order], o_thr[order], o_cnt[order]
            i = 0
            while i < o_rows.shape[0]:
                capacity = int(o_cnt[i])
                step = max(1, budget // (capacity * 8 + 16))
                j = min(o_rows.shape[0], i + step)
                capacity = int(o_cnt[j - 1])  # sorted: the block's largest
                rcnt, rbuf = run(o_rows[i:j].contiguous(), o_thr[i:j].clone(), capacity)
                check_rerun(rcnt, capacity)
                select(o_rows[i:j], rbuf)
                info["rerun_rows"] += j - i
                i = j
        else:
            select(rows, buf)
    if stats is not None:
        stats.update(info)
    return out_scores, out_items


__all__ = ["fill_topk_triton"]
