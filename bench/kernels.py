"""`svdfill bench kernels`: the fused Triton kernels vs plain torch vs the hardware floor.

One run prints, per shape, the floor measured in that same run (a device-to-device copy
gives the bandwidth for the bytes the job must move; a large torch.matmul gives the rate for
its FLOPs), the plain torch path and the fused kernel: time, throughput and time ÷ floor.
Every figure is also appended as one JSON object per line to ``--out`` (for BENCHMARKS.md).

Shapes (``--shapes``):
  * ``train-100m``: 100M planted ratings, 600k users × 3k items, d=64, batch 1M; per-epoch
    time of ``kernels.sgd.sgd_step`` vs ``fused_sgd_step`` (atomics, and plain stores), then
    lazy Adam (the synthetic-600k recipe) as the trainer's autograd + RowSparseAdam path,
    its torch twin without autograd (``kernels.row_optim``) and the fused kernels
    (``kernels.triton_row_optim``), then torch's dense Adagrad vs the fused one, each
    optimizer against its own floor; and the validation RMSE each reaches after the same
    epochs from the same init.
  * ``train-ml1m``: the MovieLens-1M shape (6,040 × 3,706, 1,000,209 ratings, 90/10), d=64,
    batch 1,024 (the config default): same columns.
  * ``fill-1m``: 1M users × 1M items × d=128, top-100, ~100 seen items per user excluded;
    plain torch tiles (timed on a user sample, scaled linearly), the same-shape GEMM alone
    (tiles, scaled), and the fused fill over all users, per compute dtype; agreement of the
    fused and torch top-k on a user sample.

Needs CUDA for the fused rows. Without it, the command says so and exits 0; ``--smoke``
instead runs tiny shapes through Triton's interpreter on the CPU (checks the plumbing, times
mean nothing), and ``--device cpu`` times the torch implementations alone at full size
(``train-ml1m``: what the CPU trainer's lazy-Adam path gains over autograd).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# each shape's (full, --smoke) sizes: train (users, items, ratings, batch, epochs, lr, Adam lr);
# fill (users, items, d, k, seen items per user)
_SIZES = {
    "train-100m": ((600_000, 3000, 100_000_000, 1 << 20, 3, 0.005, 0.01),
                   (500, 100, 5000, 1024, 2, 0.005, 0.01)),
    "train-ml1m": ((6040, 3706, 1_000_209, 1024, 15, 0.01, 0.003),
                   (604, 371, 3000, 1024, 2, 0.01, 0.003)),
    "fill-1m": ((1_000_000, 1_000_000, 128, 100, 100), (100, 300, 16, 10, 20)),
}
SHAPES = tuple(_SIZES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated subset of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append every figure as a JSON line to this file")
    parser.add_argument("--device", default="cuda",
                        help="CUDA device (default: cuda), or cpu for the torch rows only")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: run tiny shapes through Triton's interpreter on the CPU")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="training epochs per implementation (0 = 3 for train-100m, "
                             "15 for train-ml1m)")
    parser.add_argument("--fill-dtypes", default="bfloat16,tf32,float32",
                        help="compute dtypes of the fused fill to time (default: all three)")
    parser.add_argument("--torch-fill-users", type=int, default=32768,
                        help="users the plain torch fill is timed on (scaled to all users)")
    parser.add_argument("--check-users", type=int, default=2048,
                        help="users on which fused and torch top-k are compared")
    parser.add_argument("--fill-tiles", default="",
                        help="extra fused-fill tile configs to time, BLOCK_UxBLOCK_IxWARPS "
                             "comma-separated (e.g. 64x128x8,128x128x16); default tiles always run")
    parser.add_argument("--sgd-blocks", default="",
                        help="extra fused-SGD configs to time, BLOCK_NxWARPS comma-separated "
                             "(e.g. 16x4,64x8); the default always runs")
    parser.add_argument("--compile-report", action="store_true",
                        help="compile every kernel variant for sm_90 ahead of time (no GPU "
                             "needed) and print registers, stack (spills) and wgmma counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="only the final table")


# ----------------------------------------------------------------------------- timing

class _Timer:
    """Median wall time of a callable on one device (CUDA events, or perf_counter on CPU)."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def median(self, fn, repeat: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.once(fn) for _ in range(max(1, repeat)))


# ----------------------------------------------------------------------------- floors

def _copy_bandwidth(torch, timer, device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.rand(n, device=device)  # not zeros: they can run faster than real data
    dst = torch.empty_like(src)
    t = timer.median(lambda: dst.copy_(src), repeat=5, warmup=2)
    del src, dst
    return 2 * n * 4 / t


def _gemm_rate(torch, timer, device, dtype: str, size: int) -> float:
    """FLOP/s of a square torch.matmul in the given compute dtype."""
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(size, size, device=device).to(tdt)
    b = torch.randn(size, size, device=device).to(tdt)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        t = timer.median(lambda: torch.matmul(a, b), repeat=5, warmup=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2.0 * size ** 3 / t


# ----------------------------------------------------------------------------- records

class _Report:
    def __init__(self, args, device_name: str):
        self.rows: list[dict] = []
        self.out = args.out
        self.quiet = args.quiet
        self.common = {"suite": "kernels", "device": device_name, "smoke": bool(args.smoke),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def add(self, shape: str, impl: str, time_s: float | None, work: float, unit: str,
            floor_s: float | None, **extra) -> None:
        rec = dict(self.common, shape=shape, impl=impl, time_s=time_s, work=work, unit=unit,
                   throughput=(work / time_s if time_s else None),
                   ratio_to_floor=(time_s / floor_s if time_s and floor_s else None), **extra)
        self.rows.append(rec)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out, "a") as f:  # append: one run adds its lines, nothing else
                f.write(json.dumps(rec) + "\n")
        if not self.quiet:
            print(f"  {shape:<12} {impl:<34} {_fmt_t(time_s):>10}", flush=True)

    def table(self) -> str:
        lines = [f"{'shape':<12} {'implementation':<34} {'time':>10} {'throughput':>22} "
                 f"{'× floor':>8}  note"]
        for r in self.rows:
            tp = f"{r['throughput']:.3g} {r['unit']}/s" if r["throughput"] else "-"
            ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] else "-"
            lines.append(f"{r['shape']:<12} {r['impl']:<34} {_fmt_t(r['time_s']):>10} "
                         f"{tp:>22} {ratio:>8}  {r.get('note', '')}")
        return "\n".join(lines)


def _fmt_rate(flops: float) -> str:
    return f"{flops / 1e12:.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s"


# ----------------------------------------------------------------------------- training

def _planted_ratings(torch, device, n_users, n_items, n, *, rank=8, noise=0.5, seed=0):
    """Planted low-rank ratings on the device: (users int32, items int32, ratings float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pt = torch.randn(n_users, rank, device=device, generator=g) / math.sqrt(rank)
    qt = torch.randn(n_items, rank, device=device, generator=g)
    bu = 0.3 * torch.randn(n_users, device=device, generator=g)
    bi = 0.3 * torch.randn(n_items, device=device, generator=g)
    users = torch.randint(0, n_users, (n,), device=device, generator=g, dtype=torch.int32)
    items = torch.randint(0, n_items, (n,), device=device, generator=g, dtype=torch.int32)
    ratings = torch.empty(n, device=device)
    step = 1 << 24
    for lo in range(0, n, step):
        u, i = users[lo: lo + step].long(), items[lo: lo + step].long()
        r = 3.5 + bu[u] + bi[i] + (pt[u] * qt[i]).sum(1)
        ratings[lo: lo + step] = r + noise * torch.randn(r.shape[0], device=device, generator=g)
    return users, items, ratings


def _bench_train(torch, timer, report, args, device, bw, name, n_users, n_items, n, batch,
                 epochs, lr, adam_lr):
    from svdfill.kernels.triton_sgd import fused_sgd_step
    from svdfill.kernels.triton_util import triton_mode

    try:
        from svdfill.kernels.sgd import sgd_step
    except ImportError as e:  # the torch twin is the baseline: without it there is no table
        raise SystemExit(f"svdfill bench kernels: kernels.sgd.sgd_step is needed ({e})")
    d = 64
    users, items, ratings = _planted_ratings(torch, device, n_users, n_items, n, seed=args.seed)
    n_val = max(1, n // 10) if n < 10_000_000 else n // 100
    perm = torch.randperm(n, device=device, generator=torch.Generator(device=device).manual_seed(1))
    val, tr = perm[:n_val], perm[n_val:]
    vu, vi, vr = users[val].long(), items[val].long(), ratings[val]
    tu, ti, trr = users[tr], items[tr], ratings[tr]
    n_train = tr.numel()
    del perm, val, tr
    mu = float(trr.mean())
    bytes_per = 2 * (2 * d * 4) + 4 * 4 + 12  # read+write p_u, q_i; 4 bias r/w; the triple
    floor = n_train * bytes_per / bw
    report.add(name, f"floor: copy of {bytes_per} B/rating", floor, n_train, "ratings", floor,
               note=f"{bw / 1e9:.0f} GB/s measured copy; {n_train:,} ratings/epoch")

    def init():
        g = torch.Generator(device=device).manual_seed(2)
        return (0.01 * torch.randn(n_users, d, device=device, generator=g),
                0.01 * torch.randn(n_items, d, device=device, generator=g),
                torch.zeros(n_users, device=device), torch.zeros(n_items, device=device))

    def epochs_of(label, make_step, idx_dtype, floor_s, hp, graph=False):
        """Time ``epochs`` epochs of ``make_step(P, Q, bu, bi)`` (→ step(u, i, r)) from the
        same init and orders; report the median epoch and the validation RMSE reached.

        ``graph``: the epoch's steps are captured once as a CUDA graph and replayed (each
        epoch permutes into the same buffers), which removes the per-step launch cost that
        dominates small batches; the capture follows a warm-up epoch on copies of the
        tables, so the RMSE is that of the same epochs."""
        P, Q, bu, bi = init()
        step = make_step(P, Q, bu, bi)
        eu, ei = tu.to(idx_dtype), ti.to(idx_dtype)
        su, si, sr = torch.empty_like(eu), torch.empty_like(ei), torch.empty_like(trr)

        def run_epoch(fn=step):
            for lo in range(0, n_train, batch):
                fn(su[lo: lo + batch], si[lo: lo + batch], sr[lo: lo + batch])

        times, replay = [], None
        try:
            for epoch in range(epochs):
                g = torch.Generator(device=device).manual_seed(100 + epoch)
                order = torch.randperm(n_train, device=device, generator=g)
                # one gather per epoch into fixed buffers; batches are views
                torch.index_select(eu, 0, order, out=su)
                torch.index_select(ei, 0, order, out=si)
                torch.index_select(trr, 0, order, out=sr)
                del order
                if graph and replay is None:
                    replay = _capture(torch, lambda: run_epoch(make_step(
                        *(t.clone() for t in (P, Q, bu, bi)))), run_epoch)
                timer.sync()
                times.append(timer.once(replay or run_epoch))
        except Exception as e:  # a failed variant is a row, not the end of the run
            report.add(name, label, None, n_train, "ratings", floor_s, note=f"failed: {e!r}"[:200])
            return
        pred = mu + bu[vu] + bi[vi] + (P[vu] * Q[vi]).sum(1)
        rmse = float(((pred - vr) ** 2).mean().sqrt())
        # the first epoch includes compilation; the median of the rest is the figure
        t = statistics.median(times[1:]) if len(times) > 1 else times[0]
        report.add(name, label, t, n_train, "ratings", floor_s, val_rmse=rmse, epochs=epochs,
                   batch=batch, note=f"val RMSE {rmse:.4f} after {epochs} epochs", **hp)

    def sgd(fn, **extra):
        return lambda P, Q, bu, bi: lambda u, i, r: fn(P, Q, bu, bi, mu, u, i, r, lr=lr,
                                                      reg_factors=0.02, reg_bias=0.01, **extra)

    impls = [("torch sgd_step", sgd(sgd_step), torch.int64),
             ("fused (atomics)", sgd(fused_sgd_step, atomics=True), torch.int32),
             ("fused (plain Hogwild stores)", sgd(fused_sgd_step, atomics=False), torch.int32)]
    for cfg in _configs(args.sgd_blocks, 2):
        impls.append((f"fused (atomics) {cfg[0]}x{cfg[1]}",
                      sgd(fused_sgd_step, atomics=True, block_n=cfg[0], num_warps=cfg[1]),
                      torch.int32))
    fused_here = triton_mode(device) is not None  # else the fused rows would time torch
    for label, make_step, idx_dtype in impls:
        if fused_here or not label.startswith("fused"):
            epochs_of(label, make_step, idx_dtype, floor, {"lr": lr, "optimizer": "sgd"})
    if device.type == "cuda" and n_train // batch >= 200:
        # small batches: hundreds of launches an epoch, so launch cost is the bound
        epochs_of("fused (atomics), CUDA graph", sgd(fused_sgd_step, atomics=True),
                  torch.int32, floor, {"lr": lr, "optimizer": "sgd"}, graph=True)

    # row-sparse optimizers: lazy Adam (the large-batch recipe of configs/synthetic-600k.toml)
    # as the trainer's autograd path, its torch twin without autograd and the two fused
    # kernels; Adagrad as torch's dense optimizer over autograd and fused. Per rating: gathers
    # of p_u, q_i and the atomic adds into their sums; per touched row (expected distinct rows
    # of a uniform batch) the tables read + written: w, state (2 for Adam), sum
    touched = sum(rows * -math.expm1(-batch / rows) for rows in (n_users, n_items))
    for opt, tables, opt_lr in (("sparse_adam", 4, adam_lr), ("adagrad", 3, 5 * adam_lr)):
        per = 4 * d * 4 + touched / batch * 2 * tables * d * 4 + 12
        opt_floor = n_train * per / bw
        report.add(name, f"floor ({opt}): {per:.0f} B/rating", opt_floor, n_train, "ratings",
                   opt_floor, note="gathers + sums + state of the touched rows, at copy speed")
        for label, make_step, idx_dtype in _row_impls(torch, mu, opt_lr, opt):
            if fused_here or not label.startswith("fused"):
                epochs_of(label, make_step, idx_dtype, opt_floor, {"lr": opt_lr, "optimizer": opt})


def _capture(torch, warm_up, run_epoch):
    """``run_epoch``'s launches captured as a CUDA graph (after ``warm_up()``, which must
    compile the same kernels without touching the real tables); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants the kernels compiled, off the main stream
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_epoch()
    return graph.replay


def _row_impls(torch, mu, lr, optimizer):
    """(label, make_step, id dtype) of the implementations of one row-sparse optimizer
    (``sparse_adam`` or ``adagrad``); the loss is the trainer's (summed squared errors + L2
    per occurrence, ÷ the batch size)."""
    from svdfill.kernels import row_optim, triton_row_optim
    from svdfill.kernels.model import BiasedMF
    from svdfill.kernels.sgd import RowSparseAdam

    reg_f, reg_b = 0.02, 0.01
    adam = optimizer == "sparse_adam"

    def as_model(P, Q, bu, bi):
        m = BiasedMF(0, 0, 0, sparse=adam)
        m.user_factors, m.item_factors = torch.nn.Parameter(P), torch.nn.Parameter(Q)
        m.user_bias, m.item_bias = torch.nn.Parameter(bu), torch.nn.Parameter(bi)
        m.global_mean.fill_(mu)
        return m

    def optimizer_of(m):
        params = list(m.parameters())
        return RowSparseAdam(params, lr=lr) if adam else torch.optim.Adagrad(params, lr=lr)

    def autograd(P, Q, bu, bi):
        m = as_model(P, Q, bu, bi)
        opt = optimizer_of(m)

        def step(u, i, r):
            with torch.enable_grad():
                opt.zero_grad(set_to_none=True)
                pred, pen = m(u, i, reg=(reg_f, reg_b))
                (0.5 * (((r - pred) ** 2).sum() + pen) / r.shape[0]).backward()
                opt.step()
        return step

    def direct(accumulate, apply):
        def make(P, Q, bu, bi):
            m = as_model(P, Q, bu, bi)
            opt = optimizer_of(m)

            sides = row_optim.model_sides(m, opt)
            count = [0]

            def step(u, i, r):
                accumulate(*sides, mu, u, i, r, reg_factors=reg_f, reg_bias=reg_b,
                           scale=1.0 / r.shape[0])
                count[0] += 1
                for side in sides:
                    apply(side, lr=lr, step=count[0])
            return step
        return make

    k = triton_row_optim
    if adam:
        return [("torch sparse Adam (autograd)", autograd, torch.int64),
                ("torch lazy Adam (no autograd)",
                 direct(row_optim.accumulate_gradients, row_optim.apply_adam), torch.int64),
                ("fused lazy Adam", direct(k.fused_accumulate_gradients, k.fused_apply_adam),
                 torch.int32)]
    return [("torch Adagrad (autograd, dense)", autograd, torch.int64),
            ("fused Adagrad (touched rows)",
             direct(k.fused_accumulate_gradients, k.fused_apply_adagrad), torch.int32)]


# ----------------------------------------------------------------------------- fill

def _random_seen(torch, device, n_users, n_items, per_user, seed):
    """CSR of ~per_user distinct random items per user, rows sorted (duplicates dropped)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = n_users * per_user
    rows = torch.arange(n_users, device=device).repeat_interleave(per_user)
    cols = torch.randint(0, n_items, (n,), device=device, generator=g)
    keys = torch.unique(rows * n_items + cols)  # sorted, distinct
    rows, cols = keys // n_items, (keys % n_items).to(torch.int32)
    indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_users), 0)
    return indptr, cols


def _bench_fill(torch, timer, report, args, device, bw, name, n_users, n_items, d, k, per_user):
    from svdfill.kernels.fill import _budget_bytes, csr_take, fill_topk, tile_sizes
    from svdfill.kernels.triton_fill import fill_topk_triton

    g = torch.Generator(device=device).manual_seed(args.seed)
    P = torch.randn(n_users, d, device=device, generator=g) / math.sqrt(d)
    Q = torch.randn(n_items, d, device=device, generator=g)
    bu = 0.3 * torch.randn(n_users, device=device, generator=g)
    bi = 0.3 * torch.randn(n_items, device=device, generator=g)
    seen = _random_seen(torch, device, n_users, n_items, per_user, args.seed + 1)
    nnz = int(seen[1].numel())
    pairs = n_users * n_items
    flops = 2.0 * pairs * d
    dtypes = [s.strip() for s in args.fill_dtypes.split(",") if s.strip()]
    gemm_size = 8192 if device.type == "cuda" else 256
    # floors: the GEMM's FLOPs at the rate of a big square matmul, or the bytes that must move
    floors = {}
    for dt in dtypes:
        rate = _gemm_rate(torch, timer, device, dt, gemm_size)
        elt = 2 if dt == "bfloat16" else 4
        nbytes = (n_users + n_items) * d * elt + (n_users + n_items) * 4 + nnz * 4 + n_users * k * 12
        floors[dt] = max(flops / rate, nbytes / bw)
        report.add(name, f"floor ({dt}): matmul {_fmt_rate(rate)}", floors[dt], pairs,
                   "pairs", floors[dt], note=f"{flops:.3g} FLOP; {nbytes / 1e9:.2f} GB at "
                                             f"{bw / 1e9:.0f} GB/s; {nnz:,} seen")

    # the same-shape GEMM alone (scores written, no top-k): a user block × all items, scaled
    blk = min(n_users, max(1, (4 << 30) // (n_items * 2)))
    a = P[:blk].to(torch.bfloat16)
    bt = Q.to(torch.bfloat16).t()
    t_blk = timer.median(lambda: torch.matmul(a, bt), repeat=args.repeat)
    del a, bt
    t_gemm = t_blk * n_users / blk
    report.add(name, "torch.matmul bf16 alone (scores)", t_gemm, pairs, "pairs",
               floors.get("bfloat16", next(iter(floors.values()))),
               note=f"{blk:,}-user blocks, scaled ×{n_users / blk:.1f}")

    # plain torch tiles (the kernels.fill path with its own default tiles), on a user sample
    sample = min(n_users, args.torch_fill_users)
    rows = torch.arange(sample, device=device)
    sub_seen = tuple(t.to(device) for t in csr_take(seen[0].cpu(), seen[1].cpu(), rows.cpu()))
    ref = {}
    for dt in dtypes:
        blk_u, tile = tile_sizes(sample, n_items, k, _budget_bytes(device, None))

        def torch_fill():
            ref[dt] = fill_topk(P[:sample], Q, bu[:sample], bi, 3.5, k, sub_seen, dtype=dt,
                                user_block=blk_u, item_tile=tile)

        t = timer.median(torch_fill, repeat=1 if sample * n_items > 1e11 else args.repeat)
        report.add(name, f"torch fill_topk tiles ({dt})", t * n_users / sample, pairs, "pairs",
                   floors[dt], note=f"timed on {sample:,} users, scaled ×{n_users / sample:.1f}")

    # fused, all users; then agreement with torch on the first check_users users
    from svdfill.kernels.triton_util import triton_mode, unavailable_reason

    if triton_mode(device) is None:  # the fused fill raises there; say why instead of a row
        report.add(name, "fused fill: not measured", None, pairs, "pairs", None,
                   note=unavailable_reason(device))
        return
    check = min(args.check_users, sample)
    runs = [(dt, {}) for dt in dtypes]
    runs += [(dt, {"block_u": c[0], "block_i": c[1], "num_warps": c[2]})
             for c in _configs(args.fill_tiles, 3) for dt in dtypes]
    for dt, tiles in runs:
        out = {}
        stats: dict = {}

        def fused():
            out["r"] = fill_topk_triton(P, Q, bu, bi, 3.5, k, seen, dtype=dt, stats=stats, **tiles)

        t = timer.median(fused, repeat=args.repeat)
        s, i = out["r"]
        rs, ri = ref[dt]
        same = (i[:check] == ri[:check]).all(1).float().mean().item()
        finite = torch.isfinite(rs[:check]) & torch.isfinite(s[:check])
        dmax = float((s[:check] - rs[:check]).abs()[finite].max()) if bool(finite.any()) else 0.0
        label = f"fused fill ({dt})" + ("" if not tiles else " {block_u}x{block_i}x{num_warps}"
                                         .format(**tiles))
        report.add(name, label, t, pairs, "pairs", floors[dt], tiles=tiles or None,
                   rows_identical_to_torch=same, max_score_diff=dmax,
                   candidates_per_user=stats.get("candidates", 0) / max(1, n_users),
                   rerun_rows=stats.get("rerun_rows", 0),
                   note=f"{same:.2%} of {check} rows = torch; max |Δscore| {dmax:.2g}; "
                        f"{stats.get('candidates', 0) / max(1, n_users):.0f} cand/user, "
                        f"{stats.get('rerun_rows', 0)} reruns")
        del out


def _configs(text: str, n: int) -> list[tuple[int, ...]]:
    """'64x128x8,32x128x4' → [(64, 128, 8), (32, 128, 4)] (n numbers each)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        nums = part.lower().split("x")
        if len(nums) != n or not all(x.isdigit() for x in nums):
            from svdfill.errors import UserError

            raise UserError(f"bench kernels: tile config {part!r} must be {n} numbers joined by 'x'")
        out.append(tuple(int(x) for x in nums))
    return out


def _compile_report(report_lines: list[str]) -> None:
    """Ahead-of-time sm_90 compiles of every variant: registers, spills, wgmma."""
    from svdfill.kernels import triton_row_optim, triton_fill, triton_sgd
    from svdfill.kernels.triton_util import compile_report

    specs = [(triton_sgd._sgd_kernel, s) for d in (8, 64, 128) for s in triton_sgd.compile_specs(d)]
    specs += [(fn, (label, sig, const, warps)) for d in (8, 64, 128)
              for label, fn, sig, const, warps in triton_row_optim.compile_specs(d)]
    specs += [(triton_fill._fill_kernel, s) for k, d in ((100, 128), (100, 64), (10, 64), (256, 128))
              for s in triton_fill.compile_specs(k, d)]
    report_lines.append(f"{'kernel variant (sm_90)':<40} {'regs':>5} {'stack B':>8} "
                        f"{'LDG.128':>8} {'wgmma':>6} {'hmma':>5}")
    for fn, (label, sig, const, warps) in specs:
        r = compile_report(fn, sig, const, num_warps=warps)
        report_lines.append(f"{label:<40} {r['regs']:>5} {r['stack']:>8} {r['ldg128']:>8} "
                            f"{r['gmma']:>6} {r['hmma']:>5}")


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> int:
    saved = os.environ.get("TRITON_INTERPRET")
    if args.smoke:
        # the fused kernels read it per call; restored afterwards so an in-process caller
        # (a test) does not keep running every later kernel through the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return _main(args)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _main(args: argparse.Namespace) -> int:
    import torch

    from svdfill.kernels.triton_util import triton_available

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        from svdfill.errors import UserError

        raise UserError(f"bench kernels: unknown shape(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(SHAPES)}")
    if not triton_available():
        print("svdfill bench kernels: triton is not installed (pip install 'svdfill[triton]'); "
              "nothing to measure.")
        return 0
    _configs(args.fill_tiles, 3), _configs(args.sgd_blocks, 2)  # bad syntax fails up front
    if args.compile_report:
        lines: list[str] = []
        _compile_report(lines)
        print("\n".join(lines), flush=True)
        if not args.smoke and not torch.cuda.is_available():
            return 0
    if args.smoke:
        device = torch.device("cpu")
        device_name = "cpu (Triton interpreter; smoke run, times are not performance)"
    elif torch.device(args.device).type == "cpu":
        device = torch.device("cpu")
        device_name = f"cpu ({torch.get_num_threads()} threads; torch rows only)"
        if "fill-1m" in shapes:
            from svdfill.errors import UserError

            raise UserError("bench kernels --device cpu: fill-1m is a GPU shape (`svdfill "
                            "bench fill` measures the CPU fill); use --shapes train-ml1m")
    else:
        if not torch.cuda.is_available():
            print("svdfill bench kernels: needs a CUDA GPU (the fused kernels are GPU kernels); "
                  "none is visible here, so there is nothing to measure. Run it on the GPU "
                  "machine, or add --smoke for a tiny CPU run through Triton's interpreter.")
            return 0
        device = torch.device(args.device)
        if device.index is None:  # set_device needs an index: "cuda" is the current one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
    timer = _Timer(torch, device)
    report = _Report(args, device_name)
    if not args.quiet:
        print(f"svdfill bench kernels on {device_name}", flush=True)
    bw = _copy_bandwidth(torch, timer, device, (2 << 30) if device.type == "cuda"
                         else (32 << 20) if args.smoke else (512 << 20))

    with torch.no_grad():
        for shape in shapes:
            sizes = _SIZES[shape][1 if args.smoke else 0]
            if shape.startswith("train-"):
                *dims, epochs, lr, adam_lr = sizes
                _bench_train(torch, timer, report, args, device, bw, shape, *dims,
                             args.epochs or epochs, lr=lr, adam_lr=adam_lr)
            else:
                _bench_fill(torch, timer, report, args, device, bw, shape, *sizes)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(report.table())
    if args.out is not None:
        print(f"(figures appended to {args.out} as JSON lines)")
    sys.stdout.flush()
    return 0
