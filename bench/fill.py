"""`svdfill bench fill`: the fill measured against its baselines in one run.

Rows per shape (synthetic factors and seen sets, made in seconds):

- ``per-pair DataLoader``: the original approach, a torch DataLoader over every (user,
  item) pair scoring batches of 1024 by embedding lookups; timed on a sample of pairs and
  extrapolated to U × I (scoring only, no top-k: generous to it);
- ``dense product``: one ``U × I`` GEMM + seen mask + ``torch.topk``, when it fits in
  ``--dense-max-gb``;
- ``fill_topk``: the tiled exact fill (seen pairs excluded);
- ``fill_topk + Parquet``: the whole ``svdfill fill`` export path into a temporary folder;
- ``implicit recommend`` (``--peer implicit``, CPU): the implicit library's batched
  ``recommend`` for all users with ``filter_already_liked_items=True`` on the same factor
  matrices (biases folded in as ``[p_u, 1]·[q_i, b_i]``, so the rankings are the same);
- ``Spark ALS recommendForAllUsers`` (``--peer spark``, CPU): Spark MLlib's ``ALSModel``
  loaded with the same folded factors, its top-k for all users written to Parquet
  (:mod:`svdfill.bench.peer_spark`). Spark has no seen-item filter, so its items are
  compared with ``fill_topk`` without exclusion.

Throughput is pairs scored per second (U × I / wall time); ratios are against the
DataLoader. CPU time (all threads of this process) is printed too: on a shared machine it
is the steadier figure.
"""

from __future__ import annotations

import argparse
import time

SHAPES = {
    # name: (users, items, factors, k, seen pairs)
    "ml-1m": (6_040, 3_706, 64, 100, 1_000_209),
    "600k": (600_000, 3_000, 64, 100, 100_000_000),
    "1m": (1_000_000, 1_000_000, 128, 100, 100_000_000),
    "tiny": (500, 300, 8, 10, 20_000),  # smoke test of the bench itself
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="repeatable; default: ml-1m and 600k, plus 1m on CUDA")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    parser.add_argument("--peer", action="append", choices=["implicit", "spark"], default=[],
                        help="also time a peer library on the same factors (CPU)")
    parser.add_argument("--dtype", choices=["float32", "tf32", "bfloat16"], default="float32")
    parser.add_argument("--dataloader-pairs", type=int, default=200_000,
                        help="pairs the DataLoader baseline is timed on")
    parser.add_argument("--dense-max-gb", type=float, default=4.0,
                        help="largest U × I float32 score matrix the dense row may allocate")
    parser.add_argument("--no-export", action="store_true", help="skip the Parquet export row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-users", type=int, default=0,
                        help="also print the CPU fill's per-phase profile on this many users "
                             "(the selection timed both ways: numpy threshold and torch tile_topk)")


# ------------------------------------------------------------------------------------------
# synthetic problems
# ------------------------------------------------------------------------------------------

def synthetic_seen(n_users: int, n_items: int, nnz: int, seed: int = 0, chunk: int = 65_536):
    """CSR (indptr int64 [U+1], indices int32) with about ``nnz`` seen pairs, sorted rows.

    Per-user counts are uniform in [0, 2·nnz/U]; each row is a stratified random sample
    (one item from each of c disjoint integer strata of the catalogue), so rows come out
    sorted and distinct without a sort: 100M pairs take a few seconds.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    mean = nnz / max(n_users, 1)
    counts = (torch.rand(n_users, generator=g, dtype=torch.float64) * 2 * mean).round().long().clamp(0, n_items)
    indptr = torch.zeros(n_users + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    indices = torch.empty(int(indptr[-1]), dtype=torch.int32)
    for lo in range(0, n_users, chunk):
        hi = min(lo + chunk, n_users)
        c = counts[lo:hi]
        a, b = int(indptr[lo]), int(indptr[hi])
        row = torch.repeat_interleave(torch.arange(hi - lo), c)
        j = torch.arange(b - a, dtype=torch.float64) - (indptr[lo:hi] - a)[row].double()
        width = n_items / c[row].double()
        lo_j = (j * width).floor_()  # stratum j = integers [lo_j, hi_j), hi_j > lo_j
        span = ((j + 1) * width).floor_().sub_(lo_j)
        r = torch.rand(b - a, generator=g, dtype=torch.float64)
        indices[a:b] = lo_j.add_(r.mul_(span).floor_()).to(torch.int32)
    return indptr, indices


def synthetic_model(n_users: int, n_items: int, d: int, seed: int = 0, device="cpu") -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "user_factors": (torch.randn(n_users, d, generator=g) * 0.1).to(device),
        "item_factors": (torch.randn(n_items, d, generator=g) * 0.1).to(device),
        "user_bias": (torch.randn(n_users, generator=g) * 0.1).to(device),
        "item_bias": (torch.randn(n_items, generator=g) * 0.1).to(device),
        "global_mean": torch.tensor(3.6),
    }


# ------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_dataloader(state: dict, n_items: int, n_pairs: int) -> tuple[float, float]:
    """Pairs per (wall, CPU) second of the per-pair DataLoader scoring (batch 1024, default
    collate)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Pairs(Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, j):
            return j // n_items, j % n_items

    P, Q = state["user_factors"].cpu(), state["item_factors"].cpu()
    bu, bi, mu = state["user_bias"].cpu(), state["item_bias"].cpu(), float(state["global_mean"])
    n = min(n_pairs, P.shape[0] * n_items)
    t, c = time.perf_counter(), time.process_time()
    out = []
    with torch.no_grad():
        for u, i in DataLoader(Pairs(n), batch_size=1024, shuffle=False):
            out.append((P[u] * Q[i]).sum(1) + bu[u] + bi[i] + mu)
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def time_dense(state: dict, seen, k: int, device) -> tuple[float, float]:
    import torch

    P, Q = state["user_factors"], state["item_factors"]
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        S = torch.addmm(state["item_bias"].unsqueeze(0), P, Q.t())
        S += state["user_bias"].unsqueeze(1) + float(state["global_mean"])
        counts = (seen[0][1:] - seen[0][:-1]).to(device)
        rows = torch.repeat_interleave(torch.arange(P.shape[0], device=device), counts)
        S.view(-1).index_fill_(0, rows * Q.shape[0] + seen[1].to(device, torch.int64), float("-inf"))
        torch.topk(S, k, dim=1)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def time_fill(state: dict, seen, k: int, device, dtype: str) -> tuple[float, float]:
    """Best (wall, CPU) seconds of fill_topk over up to 4 runs (1 when a run takes > 1 s)."""
    from svdfill.kernels.dispatch import AUTO_TRIAL_USERS
    from svdfill.kernels.fill import csr_slice, fill_topk

    # on CUDA the first call of a shape times the fused kernel against the tiles and
    # compiles it: done here on a trial-sized prefix, so the timed runs are the steady state
    n = min(AUTO_TRIAL_USERS, state["user_factors"].shape[0])
    warm_seen = None if seen is None else csr_slice(seen[0], seen[1], 0, n)
    fill_topk(state["user_factors"][:n], state["item_factors"], state["user_bias"][:n], state["item_bias"],
              float(state["global_mean"]), k, warm_seen, dtype=dtype)
    best = (float("inf"), float("inf"))
    for rep in range(4):
        t, c = time.perf_counter(), time.process_time()
        fill_topk(state["user_factors"], state["item_factors"], state["user_bias"], state["item_bias"],
                  float(state["global_mean"]), k, seen, dtype=dtype)
        _sync(device)
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
        if best[0] > 1.0:  # long enough to be a stable measurement
            break
    return best


def time_export(state: dict, seen, k: int, device, dtype: str) -> tuple[float, float, int]:
    import os
    import tempfile

    import numpy as np

    from svdfill.data.idmap import IdMap
    from svdfill.fill.export import export_fill

    n_users, n_items = state["user_factors"].shape[0], state["item_factors"].shape[0]
    idmap = IdMap(np.arange(n_users, dtype=np.int64), np.arange(n_items, dtype=np.int64))
    with tempfile.TemporaryDirectory(prefix="svdfill-bench-") as d:
        out = os.path.join(d, "recs.parquet")
        t, c = time.perf_counter(), time.process_time()
        export_fill(state, idmap, out, k=k, seen=seen, device=device, dtype=dtype, quiet=True)
        return time.perf_counter() - t, time.process_time() - c, os.path.getsize(out)


def time_implicit(state: dict, seen, k: int):
    """(wall, CPU) seconds of implicit's batched recommend (all users), and its item lists."""
    import warnings

    import numpy as np
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    P = state["user_factors"].cpu().numpy()
    Q = state["item_factors"].cpu().numpy()
    U, I = P.shape[0], Q.shape[0]
    with warnings.catch_warnings():  # its BLAS-threads advice, followed below
        warnings.simplefilter("ignore", RuntimeWarning)
        model = AlternatingLeastSquares(factors=P.shape[1] + 1)
    model.user_factors = np.ascontiguousarray(np.hstack([P, np.ones((U, 1), np.float32)]))
    model.item_factors = np.ascontiguousarray(np.hstack([Q, state["item_bias"].cpu().numpy()[:, None]]))
    indptr, indices = seen[0].cpu().numpy(), seen[1].cpu().numpy()
    liked = sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(U, I))
    # implicit parallelizes recommend itself and asks for a single-threaded BLAS under it
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        t, c = time.perf_counter(), time.process_time()
        ids, _ = model.recommend(np.arange(U), liked, N=k, filter_already_liked_items=True)
        return time.perf_counter() - t, time.process_time() - c, ids


def profile_fill(state: dict, seen, k: int, n_users: int) -> list[tuple[str, float, float]]:
    """Per-phase (name, wall s, CPU s) of the CPU fill's block loop on the first ``n_users``
    users, on one thread — as each of ``kernels.fill``'s per-thread workers runs a block
    (default block size) — plus the torch mask and selection (``tile_topk``) the numpy ones
    replaced, timed on the same tiles. Sum over threads: divide by the thread count for wall."""
    import torch

    from svdfill.kernels import fill as F

    P, Q = state["user_factors"][:n_users].cpu(), state["item_factors"].cpu()
    bu, bi, mu = state["user_bias"][:n_users].cpu(), state["item_bias"].cpu(), float(state["global_mean"])
    U, I = P.shape[0], Q.shape[0]
    block, _ = F.tile_sizes(U, I, k, F.DEFAULT_CPU_BUDGET)
    block = min(block, max(2, F.CPU_BLOCK_CELLS // I))
    indptr, indices = seen[0].cpu(), seen[1].cpu()
    indptr_np, indices_np = indptr.numpy(), indices.numpy()
    qa_t = F._augment(Q, bi, "float32").t()
    buf = torch.empty(block * I)
    ones = torch.ones(block)
    totals: dict[str, list[float]] = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        acc = totals.setdefault(name, [0.0, 0.0])
        acc[0] += time.perf_counter() - t
        acc[1] += time.process_time() - c
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _profile_blocks(P, bu, mu, U, I, k, block, indptr, indices, indptr_np, indices_np, qa_t, buf, ones, timed)
    finally:
        torch.set_num_threads(threads)
    return [(name, w, c) for name, (w, c) in totals.items()]


def _profile_blocks(P, bu, mu, U, I, k, block, indptr, indices, indptr_np, indices_np, qa_t, buf, ones, timed):
    import numpy as np
    import torch

    from svdfill.kernels import fill as F
    from svdfill.kernels.topk import tile_topk

    pool = None
    with torch.no_grad():
        for u0 in range(0, U, block):
            u1 = min(u0 + block, U)
            s = timed("GEMM [P_B, 1]·[Q, b]ᵀ", lambda: F._scores(F._augment(P[u0:u1], ones[: u1 - u0], "float32"),
                                                               qa_t, buf))
            timed("μ + b_u add", lambda: s.add_((bu[u0:u1] + mu).unsqueeze(1)))

            def mask():  # as kernels.fill does it on CPU (numpy repeat + fancy assignment)
                a, b = int(indptr[u0]), int(indptr[u1])
                flat = np.repeat(np.arange(u1 - u0, dtype=np.int64) * I, np.diff(indptr_np[u0 : u1 + 1]))
                flat += indices_np[a:b]
                s.numpy().reshape(-1)[flat] = -np.inf

            def mask_before():  # the torch version it replaced
                a, b = int(indptr[u0]), int(indptr[u1])
                counts = indptr[u0 + 1 : u1 + 1] - indptr[u0:u1]
                flat = torch.repeat_interleave(torch.arange(u1 - u0).mul_(I), counts, output_size=b - a)
                s.view(-1).index_fill_(0, flat.add_(indices[a:b]), float("-inf"))

            timed("seen mask, numpy (now)", mask)
            timed("seen mask, torch index_fill (before)", mask_before)
            timed("top-k select, numpy threshold (now)", lambda: F.select_topk(s, k, pool))
            timed("top-k select, torch tile_topk (before)", lambda: tile_topk(s, k))


# ------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------

def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def run_shape(name: str, device, args) -> list[tuple]:
    import torch

    U, I, d, k, nnz = SHAPES[name]
    rows: list[tuple] = []
    t = time.perf_counter()
    state = synthetic_model(U, I, d, args.seed, device)
    seen = synthetic_seen(U, I, nnz, args.seed + 1)
    seen_dev = (seen[0].to(device), seen[1].to(device))
    gen_s = time.perf_counter() - t
    pairs = U * I
    print(f"\n## {name}: {U:,} users × {I:,} items, d={d}, k={k}, {int(seen[0][-1]):,} seen pairs "
          f"(generated in {gen_s:.1f} s), device {device}", flush=True)

    dl_rate, dl_cpu_rate = time_dataloader(state, I, args.dataloader_pairs)
    rows.append(("per-pair DataLoader", pairs / dl_rate, dl_rate, pairs / dl_cpu_rate,
                 f"timed on {min(args.dataloader_pairs, pairs):,} pairs, extrapolated; scoring only"))
    print(f"  DataLoader: {dl_rate:,.0f} pairs/s", flush=True)

    need = pairs * 4 * 2
    if need <= args.dense_max_gb * 2**30:
        try:
            s, c = time_dense(state, seen_dev, k, device)
            rows.append(("dense product + topk", s, pairs / s, c, "one U×I GEMM; ties not ordered"))
        except (RuntimeError, MemoryError) as e:  # out of memory on a busy machine
            rows.append(("dense product + topk", None, None, None, f"failed: {str(e).splitlines()[0][:60]}"))
    else:
        rows.append(("dense product + topk", None, None, None,
                     f"skipped: needs {need / 2**30:.1f} GiB > --dense-max-gb {args.dense_max_gb:g}"))

    s, c = time_fill(state, seen_dev, k, device, args.dtype)
    rows.append(("fill_topk", s, pairs / s, c, f"exact, seen excluded, {args.dtype}{_kernel_note(device, d, k)}"))
    print(f"  fill_topk: {s:.2f} s", flush=True)

    if not args.no_export:
        s, c, size = time_export(state, seen_dev, k, device, args.dtype)
        rows.append(("fill_topk + Parquet export", s, pairs / s, c, f"{U * k:,} rows, {size / 2**20:.0f} MiB zstd"))
        print(f"  export: {s:.2f} s", flush=True)

    if "implicit" in args.peer:
        if name == "1m":
            rows.append(("implicit recommend (CPU)", None, None, None, "skipped: 1m shape is GPU-only here"))
        else:
            try:
                import implicit  # noqa: F401
            except ImportError:
                rows.append(("implicit recommend (CPU)", None, None, None,
                             "skipped: implicit not installed (pip install 'svdfill[bench]')"))
            else:
                cpu_state = {n: v.cpu() for n, v in state.items()}
                s, c, ids = time_implicit(cpu_state, seen, k)
                from svdfill.kernels.fill import fill_topk

                _, ours = fill_topk(cpu_state["user_factors"], cpu_state["item_factors"], cpu_state["user_bias"],
                                    cpu_state["item_bias"], 0.0, k, seen)
                same = float((torch.from_numpy(ids.astype("int64")) == ours).float().mean())
                rows.append(("implicit recommend (CPU)", s, pairs / s, c, f"same items as fill_topk: {same:.1%}"))
                print(f"  implicit: {s:.2f} s", flush=True)

    if "spark" in args.peer:
        rows.append(_spark_row(name, state, k, pairs))

    if args.profile_users and device.type == "cpu":
        n = min(args.profile_users, U)
        prof = profile_fill(state, seen, k, n)
        scale = U / n
        print(f"\n| {name} CPU fill phase, one thread (first {n:,} users, scaled ×{scale:.1f} to all) "
              f"| wall | CPU |\n|---|---:|---:|")
        for label, w, c in prof:
            print(f"| {label} | {_fmt_s(w * scale)} | {_fmt_s(c * scale)} |")

    print(f"\n| {name} | wall time | pairs/s | × DataLoader | CPU time | notes |\n|---|---:|---:|---:|---:|---|")
    for label, sec, rate, cpu, note in rows:
        if sec is None:
            print(f"| {label} | — | — | — | — | {note} |")
        else:
            cpu_s = "—" if cpu is None else _fmt_s(cpu)  # a peer computing in another process
            print(f"| {label} | {_fmt_s(sec)} | {rate:,.0f} | {rate / dl_rate:,.0f}× | {cpu_s} | {note} |")
    fill = next(r for r in rows if r[0] == "fill_topk")
    export = next((r for r in rows if r[0] == "fill_topk + Parquet export"), None)
    for label, sec, _, cpu, _ in rows:
        if label.startswith("implicit") and sec:
            print(f"\nfill_topk vs implicit on {name}: {sec / fill[1]:.2f}× the throughput "
                  f"(wall), {cpu / fill[3]:.2f}× (CPU time)")
        if label.startswith("Spark") and sec:
            ours = export if export is not None and export[1] else fill
            print(f"\n{ours[0]} vs Spark ALS recommendForAllUsers + Parquet on {name}: "
                  f"{sec / ours[1]:.1f}× the throughput (wall)")
    return rows


def _kernel_note(device, d: int, k: int) -> str:
    """Which kernel fill_topk's ``auto`` chose for this shape (CUDA), and on what timing."""
    from svdfill.kernels.dispatch import kernel_choices

    for key, ch in kernel_choices().items():
        if key[0].startswith(device.type) and key[1:3] == (d, k):
            if ch["torch_s"] is None:
                return f"; kernel {ch['kernel']} ({ch['reason']})"
            return (f"; kernel {ch['kernel']} (auto: tiles {ch['torch_s'] * 1e3:.1f} ms vs fused "
                    f"{ch['triton_s'] * 1e3:.1f} ms on its trial)")
    return ""


SPARK_LABEL = "Spark ALS recommendForAllUsers + Parquet (CPU)"


def _spark_row(name: str, state: dict, k: int, pairs: int) -> tuple:
    """The Spark peer's row: its recommendForAllUsers(k) on the same folded factors, and
    how many of its items equal fill_topk's without seen exclusion (Spark has none)."""
    import torch

    from svdfill.bench.peer_spark import local_spark, recommend_all, spark_available

    if name == "1m":
        return (SPARK_LABEL, None, None, None, "skipped: 1m shape is GPU-only here")
    why = spark_available()
    if why is not None:
        return (SPARK_LABEL, None, None, None, f"skipped: {why}")
    from svdfill.kernels.fill import fill_topk

    cpu_state = {n: v.cpu() for n, v in state.items()}
    with local_spark() as spark:
        start = spark.start_seconds
        res = recommend_all(spark, cpu_state, k)
    _, ours = fill_topk(cpu_state["user_factors"], cpu_state["item_factors"], cpu_state["user_bias"],
                        cpu_state["item_bias"], 0.0, k, None)
    same = float((torch.from_numpy(res["items"]) == ours).float().mean())
    s = res["seconds"]
    print(f"  spark: {s:.2f} s (JVM start {start:.1f} s, not timed)", flush=True)
    return (SPARK_LABEL, s, pairs / s, None,
            f"no seen filter in Spark; same items as fill_topk without it: {same:.1%}; "
            f"JVM start {start:.1f} s not timed")


def main(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    # `svdfill bench fill` has checked --device already (launch.cmd_bench); None: cuda if present
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device in (None, "", "auto") else args.device)
    shapes = args.shape or (["ml-1m", "600k"] + (["1m"] if device.type == "cuda" else []))
    cpu = platform.processor() or platform.machine()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"# svdfill bench fill — {time.strftime('%Y-%m-%d %H:%M:%S')} — {dev_name}")
    for name in shapes:
        if name == "1m" and device.type != "cuda":
            print(f"\n## {name}: skipped (GPU shape; rerun with --device cuda on a GPU machine)")
            continue
        run_shape(name, device, args)
    return 0
