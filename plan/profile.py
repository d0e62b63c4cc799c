"""A small device profile for the planner, and its measurement on this machine.

:class:`DeviceProfile` holds the handful of rates the estimators of
:mod:`svdfill.plan.estimate` divide by. :func:`h100_profile` and :func:`cpu_profile` are the
documented defaults; ``svdfill plan --calibrate`` (:func:`calibrate`) measures the same
figures here, with the same operations the trainer runs (a batched Gram ``bmm``, a batched
Cholesky solve, random-row gathers, a contiguous copy, a gloo all-reduce on loopback
between 2 processes), and writes them as JSON that ``--profile`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

GiB = float(1 << 30)


@dataclass
class DeviceProfile:
    """What one rank's device can do (rates are per rank, or per machine when ``cores`` > 0)."""

    name: str
    """A label printed in the plan's header (``h100``, ``cpu``, ``calibrated: <host>``)."""
    gemm_flops: float
    """FLOP/s of the batched Gram products ``bmm([S, k, L], [S, L, k])`` (float32)."""
    solve_flops: float
    """FLOP/s of the batched Cholesky factor + solve of ``[B, k, k]`` systems (counted as
    ``k³/3 + 2k²`` per system)."""
    mem_bw: float
    """B/s of random-row gathers and scatters (``index_select`` / ``index_add_`` of rows of a
    table), counting bytes read plus bytes written."""
    copy_bw: float
    """B/s of contiguous elementwise work (``copy_``, ``zero_``, ``+=``), read plus written."""
    net_bw: float
    """B/s per rank through the collectives: bus bandwidth of a ring all-reduce (its
    ``2(W−1)/W × size`` bytes per rank over its time), and of a point-to-point shift."""
    latency: float
    """Seconds per collective call, whatever its size."""
    op_overhead: float
    """Seconds per launched tensor operation (dispatch and kernel launch)."""
    memory_bytes: float
    """Memory one rank may fill (GPU: its HBM as torch sees it; CPU: the machine's RAM,
    shared by its W processes)."""
    cores: int = 0
    """0: every rank has a device of its own (GPU). > 0: a CPU with this many cores whose
    rates above were measured with all of them; W processes share them (each gets
    ``cores / W``), and the memory too."""
    sgd_rate: float = 0.0
    """Rating·column units (ratings × (d + 1)) per second of the real SGD step
    (:func:`svdfill.kernels.sgd.sgd_step`, batches of 1024 ratings on rows drawn at random
    from large tables), on ONE thread of a CPU or one GPU. Steps of 1024 ratings are bound
    by dispatch and scattered rows, not by flops or bandwidth, so the profile measures the
    step itself. 0 (a profile from before it was measured): the CPU default's."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DeviceProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in d and n not in ("cores", "sgd_rate"))
        if missing:
            raise ValueError(f"device profile lacks {', '.join(missing)}")
        out = cls(**{k: v for k, v in d.items() if k in names})
        if not d.get("sgd_rate"):  # written before the step was measured
            out.sgd_rate = CPU_SGD_RATE
        for f in dataclasses.fields(cls):
            v = getattr(out, f.name)
            if f.name not in ("name", "cores") and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"device profile: {f.name} must be a positive number, got {v!r}")
        return out

    def share(self, workers: int) -> float:
        """The fraction of this profile's compute and memory rates one of ``workers`` ranks
        gets: 1 on a GPU (a device each), ``1/W`` on a CPU (the cores are shared)."""
        return 1.0 if self.cores <= 0 else 1.0 / max(1, workers)

    def net_share(self, workers: int) -> float:
        """The fraction of :attr:`net_bw` per rank: 1 on GPUs; on a CPU the loopback
        bandwidth was measured with 2 processes and is memory copies, so more processes
        than that split it (``min(1, 2/W)``)."""
        return 1.0 if self.cores <= 0 else min(1.0, 2.0 / max(1, workers))

    def memory_per_rank(self, workers: int) -> float:
        """Memory one rank may use: the device's, or on a CPU the RAM split W ways."""
        return self.memory_bytes if self.cores <= 0 else self.memory_bytes / max(1, workers)


def h100_profile() -> DeviceProfile:
    """An NVIDIA H100 SXM5 80 GB, one per rank, 8 per node with InfiniBand between nodes.

    Assumptions (NVIDIA H100 datasheet; the ALS Gram ``bmm`` runs in float32 because torch
    leaves TF32 matmuls off by default):

    - float32 (non-tensor-core) peak 67 TFLOP/s; a batched ``bmm`` at k ≈ 129 sustains
      about 60%: ``gemm_flops = 40e12`` (TF32 tensor cores would give 495e12 dense, BF16 989e12).
    - batched Cholesky of small (k ≈ 129) systems is latency bound, about 2 TFLOP/s.
    - HBM3 3.35 TB/s; random 0.5 kB row gathers reach about 60% (2.0e12), contiguous copies 90%.
    - network: NVLink 4 gives 450 GB/s per direction inside a node, but a job over several
      nodes is held to the inter-node link: one ConnectX-7 NDR 400 Gb/s (50 GB/s) per GPU,
      about 80% of it as NCCL bus bandwidth → ``net_bw = 40e9``; ``latency = 30 µs`` per
      inter-node collective.
    - 10 µs per launched op; 79 GiB usable of the 80 GB HBM3 (what torch reports).
    - SGD step: the one H100 figure measured so far, the plain-PyTorch baseline of
      ``tools/torch-baselines.py`` (a 100M-rating epoch at d = 64 in 3.98 s: 25.1M
      ratings/s × 65 columns ≈ 1.6e9); svdfill's fused step aims at 20× that, unmeasured.
    """
    return DeviceProfile(name="h100", gemm_flops=40e12, solve_flops=2e12, mem_bw=2.0e12,
                         copy_bw=3.0e12, net_bw=40e9, latency=30e-6, op_overhead=10e-6,
                         memory_bytes=79 * GiB, cores=0, sgd_rate=1.6e9)


CPU_SGD_RATE = 1e8
"""The CPU default of :attr:`DeviceProfile.sgd_rate` (one thread): ``svdfill plan
--calibrate`` measured 0.93–1.04e8 on the 2-core AVX-512 development VM (three runs,
2026-12-06), a 1024-rating step at d = 64 in about 0.67 ms, its gathers included."""


def _machine_ram() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * GiB


def cpu_profile(cores: int | None = None, memory_bytes: float | None = None) -> DeviceProfile:
    """A generic x86 server core with AVX2 (per core: ~25 GFLOP/s float32 in a batched small
    ``bmm``, ~3 GFLOP/s batched Cholesky, ~1.5 GB/s random-row gathers, ~4 GB/s contiguous
    copies), times this machine's cores; gloo over loopback ~1 GB/s and 50 µs per
    collective; this machine's RAM. Rough by design: ``svdfill plan --calibrate`` measures
    the real figures (it was 2–3× off in either direction on the machines we tried)."""
    c = int(cores or os.cpu_count() or 1)
    return DeviceProfile(name="cpu", gemm_flops=25e9 * c, solve_flops=3e9 * c, mem_bw=1.5e9 * c,
                         copy_bw=4e9 * c, net_bw=1e9, latency=50e-6, op_overhead=5e-6,
                         memory_bytes=float(memory_bytes or _machine_ram()), cores=c,
                         sgd_rate=CPU_SGD_RATE)


def profile_for(device: str) -> DeviceProfile:
    """The default profile of ``device`` (``h100`` or ``cpu``)."""
    if device == "h100":
        return h100_profile()
    if device == "cpu":
        return cpu_profile()
    raise ValueError(f"no default profile for device {device!r} (h100 or cpu)")


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """A profile written by :func:`save_profile` (``svdfill plan --calibrate --out``)."""
    with open(path, encoding="utf-8") as f:
        return DeviceProfile.from_json(json.load(f))


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> None:
    """Write ``profile`` as JSON, atomically (temp name, then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(profile.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)


# -- calibration ---------------------------------------------------------------------------------

def _rate(fn, work: float, min_seconds: float, *, cpu: bool = False) -> float:
    """``work`` per second of ``fn``: the median of a few timings of a batch of calls long
    enough (≥ ``min_seconds / 4`` of wall time) for a coarse clock, after one warm-up. With
    ``cpu``, in CPU seconds of this process (all its threads), which other processes' load
    does not inflate; else wall seconds."""
    clock = time.process_time if cpu else time.perf_counter
    fn()
    reps, block = 1, max(min_seconds / 4, 0.02)
    while True:  # calls per timed batch
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if time.perf_counter() - t >= block or reps >= 1 << 16:
            break
        reps *= 2
    times = []
    for _ in range(3):
        t = clock()
        for _ in range(reps):
            fn()
        times.append(clock() - t)
    return work * reps / max(sorted(times)[1], 1e-9)


def _net_rank(rank: int, port: int, nbytes: int, reps: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        big = torch.ones(nbytes // 4)
        tiny = torch.ones(1)
        for t in (big, tiny):
            dist.all_reduce(t)
        times = {}
        for name, t in (("big", big), ("tiny", tiny)):
            took = []
            for _ in range(reps):
                dist.barrier()
                s = time.perf_counter()
                dist.all_reduce(t)
                took.append(time.perf_counter() - s)
            # the median, not the best: on loopback the best of 20 is twice the median
            # (2.7 vs 1.3 GB/s at 8 MiB), and training runs at the steady rate
            times[name] = sorted(took)[len(took) // 2]
        if rank == 0:
            out.put(times)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_network(nbytes: int = 8 << 20, reps: int = 11, timeout: float = 120.0) -> tuple[float, float]:
    """``(net_bw, latency)`` of a gloo all-reduce between 2 processes on loopback: the bus
    bandwidth ``2(W−1)/W × nbytes / t`` (W = 2) of an ``nbytes`` all-reduce, and the time of
    a one-float one (``t``: the median of ``reps`` timings)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_net_rank, args=(r, port, nbytes, reps, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        times = out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    lat = times["tiny"]
    return nbytes / max(times["big"] - lat, 1e-9), lat


def calibrate(*, size: str = "small", network: bool = True, min_seconds: float = 0.2,
              k: int = 65) -> DeviceProfile:
    """Measure this machine's :class:`DeviceProfile` on its CPU with the operations the
    trainer runs, for rows of ``k = d + 1`` columns. ``size``: ``"tiny"`` (tests: a second or
    two) or ``"small"`` (default: a few seconds, steadier). ``network=False`` keeps the CPU
    defaults' network figures instead of starting 2 processes.

    Compute and memory rates are timed in CPU seconds of this process (so the load of other
    processes does not make them look slow) and scaled to the machine's cores: the rates of
    this machine when it is quiet, if the work spreads over its cores. The network figures
    are the median of a few wall-clock timings."""
    import torch

    tiny = size == "tiny"
    cores = os.cpu_count() or 1
    L, S = (32, 128) if tiny else (64, 512)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(S, L, k, generator=g)
    at = a.transpose(1, 2)
    gemm = _rate(lambda: torch.bmm(at, a), 2.0 * S * L * k * k, min_seconds, cpu=True) * cores

    # as many systems as one ALS chunk solves at once (its Grams fill the 2^24-element
    # budget): the factorization of a batch out of cache is several times slower per system
    B = 256 if tiny else max(64, (1 << 24) // (k * k))
    spd = torch.bmm(at[:1].expand(B, k, L).contiguous(), a[:1].expand(B, L, k).contiguous())
    spd += torch.eye(k) * k
    rhs = torch.randn(B, k, 1, generator=g)

    def solve():
        chol, _ = torch.linalg.cholesky_ex(spd)
        torch.cholesky_solve(rhs, chol)

    solve_rate = _rate(solve, B * (k ** 3 / 3 + 2 * k * k), min_seconds, cpu=True) * cores

    rows, n = (50_000, 100_000) if tiny else (400_000, 1_000_000)
    table = torch.randn(rows, k, generator=g)
    idx = torch.randint(0, rows, (n,), generator=g)
    gather = _rate(lambda: table.index_select(0, idx), 2.0 * n * k * 4, min_seconds, cpu=True) * cores
    src = torch.randn(n, k, generator=g)
    scatter = _rate(lambda: table.index_add_(0, idx, src), 3.0 * n * k * 4, min_seconds, cpu=True) * cores

    m = (4 << 20) if tiny else (32 << 20)
    x, y = torch.empty(m // 4), torch.ones(m // 4)
    copy = _rate(lambda: x.copy_(y), 2.0 * m, min_seconds, cpu=True) * cores

    sgd = _sgd_step_rate(k, tiny, min_seconds)

    one = torch.ones(1)
    reps = 200
    per_op = 1.0 / _rate(lambda: [one.add_(1.0) for _ in range(reps)], reps, min_seconds / 2, cpu=True)

    base = cpu_profile()
    net_bw, lat = measure_network(nbytes=(1 << 20) if tiny else (8 << 20)) if network else (base.net_bw, base.latency)
    import socket

    return DeviceProfile(name=f"calibrated: {socket.gethostname()}", gemm_flops=gemm,
                         solve_flops=solve_rate, mem_bw=2.0 / (1.0 / gather + 1.0 / scatter),
                         copy_bw=copy, net_bw=net_bw, latency=lat, op_overhead=per_op,
                         memory_bytes=base.memory_bytes, cores=cores, sgd_rate=sgd)


def _sgd_step_rate(k: int, tiny: bool, min_seconds: float, batch: int = 1024) -> float:
    """:attr:`DeviceProfile.sgd_rate` of this CPU: the trainer's step loop on one thread, in
    CPU seconds (the thread count is put back afterwards): each call slices the next batch
    of a shuffled epoch, gathers its users, items and ratings, and steps — new rows every
    call, as in training (a fixed batch would keep its rows in cache)."""
    import torch

    from svdfill.kernels.sgd import sgd_step

    g = torch.Generator().manual_seed(1)
    users, items, n = (50_000, 5_000, 200_000) if tiny else (400_000, 20_000, 2_000_000)
    P, Q = torch.randn(users, k - 1, generator=g) * 0.1, torch.randn(items, k - 1, generator=g) * 0.1
    bu, bi = torch.zeros(users), torch.zeros(items)
    u = torch.randint(0, users, (n,), generator=g)
    i = torch.randint(0, items, (n,), generator=g)
    r = torch.rand(n, generator=g) * 4 + 1
    perm = torch.randperm(n, generator=g)
    at = [0]

    def step() -> None:
        a = at[0]
        at[0] = (a + batch) % (n - batch)
        idx = perm[a:a + batch]
        sgd_step(P, Q, bu, bi, 3.5, u[idx], i[idx], r[idx], lr=0.005, reg_factors=0.02, reg_bias=0.02)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rate(step, float(batch * k), min_seconds, cpu=True)
    finally:
        torch.set_num_threads(threads)
