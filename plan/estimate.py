"""Estimators of one training sweep (or epoch) and one fill, per rank, for the ``items`` and
``grid`` layouts: memory, bytes sent through the collectives, and time. Pure functions of a
:class:`Problem` and a :class:`~svdfill.plan.profile.DeviceProfile`.

Byte models (bytes SENT per rank; float32 tables, ``k = d + 1`` columns per row: the
factors and the bias; U users, I items, R ratings, W ranks):

``items`` layout (item shards, replicated user table, :mod:`svdfill.distributed.world`):

- ALS sweep (:func:`svdfill.kernels.als.als_sweep` with ``user_sum``): the users' normal
  equations are all-reduced block by block over *every* user, ``U·(k² + k)`` float32 per
  sweep, in ``2·⌈U / ⌊2²⁴/k²⌋⌉`` all-reduces (Gram and right-hand side per block).
- SGD epoch (Funk, :mod:`svdfill.train.funk_sgd`): every step all-reduces the user deltas
  ``U·d + U`` float32; ``⌈(R/W) / batch⌉`` steps. Row-sparse optimizers
  (:mod:`svdfill.train.row_sparse`) all-reduce the user gradient sums and int32 marks,
  ``U·(d + 2)`` 4-byte words per step; autograd optimizers (DDP) the dense user gradients,
  ``U·(d + 1)`` float32 per step.
- An all-reduce of ``S`` bytes sends ``2(W−1)/W · S`` bytes per rank (ring all-reduce;
  also NCCL's bus-bandwidth convention). A single rank sends nothing.
- Fill (:class:`svdfill.distributed.sharded_fill.TorchrunExchange`): every rank computes each
  user's top-k over its item shard and sends it to the block's owner: ``(W−1)/W · U·k·12``
  bytes (float32 score + int64 item per entry).

``grid`` layout (:mod:`svdfill.distributed.grid`, :mod:`svdfill.distributed.ring`):

- ALS half-sweep: the rows of the other side needed by this rank's block that it does not
  own, ``4k`` bytes each (``RowExchange``). With popularity weights ``p_i`` (a power law of
  exponent ``zipf`` over the items, ``user_skew`` over the users, as
  :mod:`svdfill.data.synth` draws them), a block's ``R/W`` ratings touch
  ``E[distinct items] = Σ_i 1 − (1 − p_i)^{R/W}`` items, of which a fraction ``(W−1)/W``
  live elsewhere (ids are permuted, so ownership is independent of popularity); by
  symmetry each rank sends what it receives. The sweep is both halves.
- DSGD epoch (:mod:`svdfill.distributed.dsgd`): ``W`` shifts of the item block held (Q rows,
  b_i, and the item optimizer state, ``m`` moments per parameter: 0 for Funk SGD, 1 for
  Adagrad, whose per-row sums travel with their rows): every item block passes through
  every rank once, ``I · k · (1 + m) · 4`` bytes per rank (the ring's ``bytes_sent``; plus
  ``8`` bytes per tensor dimension of shape header per shift). DSGD's Adagrad runs as
  row-sparse steps (:func:`~svdfill.distributed.dsgd.dsgd_adagrad_epoch`): per rank the sums
  of its user block and of the item block it holds (``(U/W + I/W) · k · 4``), their
  gradient scratch and marks; no all-reduce. The grid does not run adam / sparse_adam
  (a note says so; the figures are then Adagrad-like).
- Fill (:mod:`svdfill.fill.grid_fill`): ``W − 1`` shifts of the item blocks,
  ``(W − 1)/W · I · k · 4`` bytes per rank on average.

Memory (bytes per rank): tables, optimizer state, synchronization buffers, ratings (as
the trainer holds them: ``Ratings`` int32/int32/float32 on the host plus ``DeviceRatings``
int64/int64/float32 on the device; on a CPU device the float32 ratings are shared), the ALS
plan (int32 column and position per padded slot per side) and the largest transient (one
ALS chunk's gathered features, targets and Grams ≈ 3 budgets, plus the fixed side's
``[q_i, 1]`` copy; a fill's tiles).

Time: compute (Gram ``bmm`` 2k² flops per rating per half, Cholesky ``k³/3 + 2k²`` per
solved row), memory traffic (gathers 3·4k bytes per padded rating per half), per-op launch
overhead, SGD steps at the profile's measured step rate (``sgd_rate``), and the
network (``latency`` per collective + bytes / ``net_bw``), each at the rank's share of the
device (``cores / W`` of a CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from svdfill.plan.profile import DeviceProfile

SOLVERS = ("als", "sgd")
OPTIMIZERS = ("sgd", "adam", "sparse_adam", "adagrad")
LAYOUTS = ("items", "grid")

MOMENTS = {"sgd": 0, "adam": 2, "sparse_adam": 2, "adagrad": 1}
"""Optimizer state tensors per parameter (Adam's two moments, Adagrad's sum of squares)."""

ALS_PAD = 1.15
"""Padded slots per rating in the ALS chunks (rows of a chunk differ by at most 1.25× in
count, and rows under 16 ratings share chunks: about 15% padding on power-law data)."""

ALS_CPU_BUDGET = 1 << 24
"""Elements of one ALS chunk's gathered features on a CPU (kernels.als.DEFAULT_BUDGET_ELEMENTS)."""
ALS_CUDA_BUDGET = 1 << 28
"""... and at most on CUDA (a sixteenth of free memory, capped: MAX_CUDA_BUDGET_ELEMENTS)."""
USER_BLOCK_BUDGET = 1 << 24
"""The summed user blocks of the items layout are cut by the CPU budget on every device."""

MIN_FILL_TILES = 256 * 2**20
"""The tile memory a fill needs at the least (what ``fits`` counts; it runs slower in less)."""
FILL_CPU_BUDGET = 256 * 2**20
"""A fill's tile memory on a CPU (kernels.fill.DEFAULT_CPU_BUDGET); on a GPU it takes 60% of
what is free, so it is reported as what is left rather than as a need."""

RUNTIME_CPU = 24 * 2**20
"""Resident memory a CPU rank gains beyond its tensors while it trains: allocator arenas,
gloo's buffers, thread pools (measured 15–30 MiB with ``svdfill bench plan``)."""
RUNTIME_GPU = 1.0 * 2**30
"""Device memory a GPU rank loses to the runtime: the CUDA context (~500 MiB on an H100),
cuBLAS/cuSOLVER workspaces and NCCL's buffers (an assumption, ~1 GiB)."""
ALS_OPS_PER_CHUNK = 14
"""Tensor ops launched per ALS chunk (gathers, ``bmm``s, Cholesky, solve, scatters)."""


@dataclass(frozen=True)
class Problem:
    """The job to plan."""

    n_users: int
    """U: users (rows of P)."""
    n_items: int
    """I: items (rows of Q)."""
    n_ratings: int
    """R: training ratings."""
    factors: int
    """d: factors per row (each row also has a bias: k = d + 1 columns)."""
    workers: int
    """W: ranks."""
    solver: str = "als"
    """als | sgd (under the grid layout, sgd is DSGD)."""
    optimizer: str = "sgd"
    """For solver sgd: sgd (Funk) | adam | sparse_adam | adagrad."""
    batch_size: int = 1024
    """Ratings per SGD step (train.batch_size)."""
    topk: int = 100
    """k of the fill's top-k per user."""
    zipf: float = 0.8
    """Item-popularity power-law exponent (data.synthetic.zipf; 0 = uniform)."""
    user_skew: float = 0.5
    """User-activity power-law exponent (data.synthetic.user_skew; 0 = uniform)."""
    als_budget: int | None = None
    """Elements of one ALS chunk; None = the device's default."""
    metrics_sample: int = 1_000_000
    """train.metrics_sample: ratings of the per-epoch train-metrics sample (DSGD keeps them)."""

    def check(self) -> None:
        for name in ("n_users", "n_items", "n_ratings", "factors", "workers", "batch_size", "topk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.zipf < 0 or self.user_skew < 0:
            raise ValueError("zipf and user_skew must be >= 0")
        if self.workers > min(self.n_users, self.n_items):
            raise ValueError(f"{self.workers} workers but only {self.n_users} users and "
                             f"{self.n_items} items: every rank needs a block of each")


@dataclass
class Estimate:
    """One layout's plan, per rank (the busiest rank of balanced blocks)."""

    layout: str
    memory: dict[str, float]
    """Bytes by part (persistent parts, then the largest transient)."""
    capacity: float
    """Bytes one rank may use on the profile's device."""
    sweep_bytes: float
    """Bytes sent per rank per sweep (ALS) or epoch (SGD)."""
    sweep_collectives: int
    """Collective calls per sweep/epoch."""
    fill_bytes: float
    """Bytes sent per rank by the fill."""
    sweep_time: dict[str, float]
    """Seconds per sweep/epoch by part: compute, memory, launch, network; and total."""
    fill_time: dict[str, float]
    """Seconds of the fill by part, and total."""
    fill_memory: float
    """Bytes one rank holds during the fill (tables + tiles; on a GPU the tiles take 60% of
    what is free, so this is most of the device)."""
    fill_needed: float = 0.0
    """Bytes the fill cannot do without: its tables and buffers plus one small tile set
    (``MIN_FILL_TILES``); what ``fits`` checks."""
    notes: list[str] = field(default_factory=list)
    host_separate: bool = False
    """True when the device is not the host (GPU): ``(host)`` parts are not device memory."""

    @property
    def memory_total(self) -> float:
        """Bytes on the device: every part, less the ``(host)`` parts when the device is a
        GPU (``capacity`` is then the GPU's memory)."""
        return float(sum(v for k, v in self.memory.items()
                         if not (self.host_separate and k.endswith("(host)"))))

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.capacity and self.fill_needed <= self.capacity

    def to_json(self) -> dict:
        return {"layout": self.layout, "memory": dict(self.memory), "memory_total": self.memory_total,
                "capacity": self.capacity, "fits": self.fits, "sweep_bytes": self.sweep_bytes,
                "sweep_collectives": self.sweep_collectives, "fill_bytes": self.fill_bytes,
                "sweep_time": dict(self.sweep_time), "fill_time": dict(self.fill_time),
                "fill_memory": self.fill_memory, "fill_needed": self.fill_needed,
                "notes": list(self.notes)}


# -- the popularity model ---------------------------------------------------------------------------

_CHUNK = 1 << 22


def _power_sum(n: int, exponent: float, fn) -> float:
    """``Σ_{j=1..n} fn(w_j)`` with ``w_j = j^-exponent / Σ j^-exponent`` (chunked: n may be 1e8)."""
    z = 0.0
    for lo in range(1, n + 1, _CHUNK):
        j = np.arange(lo, min(n, lo + _CHUNK - 1) + 1, dtype=np.float64)
        z += float((j ** -float(exponent)).sum())
    out = 0.0
    for lo in range(1, n + 1, _CHUNK):
        j = np.arange(lo, min(n, lo + _CHUNK - 1) + 1, dtype=np.float64)
        out += float(fn(j ** -float(exponent) / z).sum())
    return out


@functools.lru_cache(maxsize=64)
def expected_distinct(n: int, draws: float, exponent: float) -> float:
    """Expected distinct ids among ``draws`` draws from ``n`` ids with power-law weights
    ``∝ rank^-exponent``: ``Σ_j 1 − (1 − w_j)^draws`` (0 = uniform)."""
    if draws <= 0 or n <= 0:
        return 0.0
    if exponent == 0:
        return float(-n * math.expm1(draws * math.log1p(-1.0 / n))) if n > 1 else 1.0
    return _power_sum(n, exponent, lambda w: -np.expm1(draws * np.log1p(-np.minimum(w, 1.0 - 1e-16))))


def grid_needed_rows(p: Problem) -> tuple[float, float]:
    """``(items, users)``: expected rows of the other side one rank's block needs and does
    not own, for the user half-sweep (items) and the item half-sweep (users)."""
    W = p.workers
    if W == 1:
        return 0.0, 0.0
    m = p.n_ratings / W
    off = (W - 1) / W
    return (expected_distinct(p.n_items, m, p.zipf) * off,
            expected_distinct(p.n_users, m, p.user_skew) * off)


# -- helpers ------------------------------------------------------------------------------------------

def allreduce_sent(nbytes: float, W: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: ``2(W−1)/W · nbytes``."""
    return 0.0 if W <= 1 else 2.0 * (W - 1) / W * nbytes


def _ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))


ALS_CHUNK_BUDGETS = 4.0
"""Float32 budgets one ALS chunk holds at its peak: its gathered features, its Grams and
their Cholesky factor (3, as kernels.als says), plus the allocator's slack: 4 fits the
peaks measured by ``svdfill bench plan``."""


def _chunk_bytes(n: float, k: int, budget: int) -> float:
    """One ALS chunk at its peak (:data:`ALS_CHUNK_BUDGETS` budgets of float32), or as many
    times the half's padded features when they are smaller than a budget."""
    return ALS_CHUNK_BUDGETS * 4 * min(float(budget), n * ALS_PAD * k)


def als_budget(p: Problem, profile: DeviceProfile) -> int:
    if p.als_budget is not None:
        return int(p.als_budget)
    return ALS_CPU_BUDGET if profile.cores > 0 else ALS_CUDA_BUDGET


def ratings_bytes(n: float, profile: DeviceProfile) -> dict[str, float]:
    """Memory of ``n`` local ratings as the trainer holds them (see the module docstring)."""
    if profile.cores > 0:  # the device is the host: int64 copies of the ids, floats shared
        return {"ratings": n * (12 + 16)}
    return {"ratings": n * 20, "ratings (host)": n * 12}


def _sgd_path(optimizer: str) -> str:
    """How the trainer runs ``optimizer`` (train.factory, torch kernels on nccl or fused):
    ``funk`` (plain SGD deltas), ``rowsparse`` (sparse_adam), ``autograd`` (adam, adagrad)."""
    return {"sgd": "funk", "sparse_adam": "rowsparse"}.get(optimizer, "autograd")


def _sync_floats_per_step(p: Problem) -> float:
    """4-byte words all-reduced per SGD step in the items layout."""
    U, d = p.n_users, p.factors
    path = _sgd_path(p.optimizer)
    return U * (d + 2) if path == "rowsparse" else U * (d + 1)


def _grid_sgd_path(optimizer: str) -> str:
    """How DSGD (:class:`svdfill.train.dsgd.DSGDSolver`) runs ``optimizer``: ``funk`` (sgd)
    or ``rowsparse`` (adagrad: accumulate + apply on the block's rows, fused or torch).
    adam / sparse_adam are refused there (UserError); the planner prices them as rowsparse."""
    return "funk" if optimizer == "sgd" else "rowsparse"


GRID_OPTIMIZERS = ("sgd", "adagrad")
"""The ``train.optimizer`` values the grid layout's DSGD runs."""


def _optimizer_memory(rows: float, k: int, optimizer: str, path: str | None = None
                      ) -> dict[str, float]:
    m = MOMENTS[optimizer]
    path = path or _sgd_path(optimizer)
    out = {"optimizer state": rows * k * 4 * m}
    if path == "rowsparse":
        out["gradient sums"] = rows * (k * 4 + 4)
    elif path == "autograd":
        out["gradients"] = rows * k * 4
    return out


# -- the items layout ---------------------------------------------------------------------------------

def items_estimate(p: Problem, profile: DeviceProfile) -> Estimate:
    """The item-sharded layout: every rank holds all of P and its ⌈I/W⌉ rows of Q."""
    p.check()
    W, U, d = p.workers, p.n_users, p.factors
    k = d + 1
    I_loc = _ceil_div(p.n_items, W)
    n = p.n_ratings / W
    mem: dict[str, float] = {"user table (all)": U * k * 4.0, "item table (shard)": I_loc * k * 4.0}
    mem["runtime"] = RUNTIME_CPU if profile.cores > 0 else RUNTIME_GPU
    mem.update(ratings_bytes(n, profile))
    mem["rating counts"] = U * 8.0 + I_loc * 8.0
    notes = []
    if p.solver == "als":
        budget = als_budget(p, profile)
        plan_sides = 2 + (1 if W > 1 else 0)  # user side, item side, (summed user blocks)
        mem["ALS plan"] = n * ALS_PAD * 8.0 * plan_sides
        block = 0.0
        if W > 1:
            rows = max(1, USER_BLOCK_BUDGET // (k * k))
            block = min(rows, U) * (k * k + k) * 4.0
        # user half: a summed block's Grams with a chunk's buffers, or while it is solved
        # (the Grams, the solved rows' copy and their Cholesky factors); item half: a chunk
        # and the [p_u, 1] copy of the whole user table
        chunk = _chunk_bytes(n, k, budget)
        mem["ALS transient"] = max((I_loc + 1) * k * 4.0 + max(block + chunk, 3 * block),
                                   (U + 1) * k * 4.0 + chunk)
        sweep_bytes, colls, t = _items_als_time(p, profile, n, I_loc, budget)
    else:
        mem.update(_optimizer_memory(U + I_loc, k, p.optimizer))
        if W > 1 and _sgd_path(p.optimizer) == "funk":
            mem["user delta buffers"] = U * k * 4.0
        if W > 1 and _sgd_path(p.optimizer) == "autograd":
            mem["DDP buckets"] = U * k * 4.0
        mem["epoch order"] = n * 8.0  # the epoch's int64 permutation
        sweep_bytes, colls, t = _items_sgd_time(p, profile, n, I_loc)
    held = mem["user table (all)"] + mem["item table (shard)"] + mem["runtime"]
    fill_bytes, fill_t, tiles = _items_fill(p, profile, I_loc, held)
    fill_mem = held + tiles
    fill_need = held + min(tiles, MIN_FILL_TILES)
    return Estimate("items", mem, profile.memory_per_rank(W), sweep_bytes, colls, fill_bytes, t,
                    fill_t, fill_mem, fill_need, notes, host_separate=profile.cores <= 0)


def _net_time(profile: DeviceProfile, W: int, nbytes: float, calls: float) -> float:
    if W <= 1:
        return 0.0
    return calls * profile.latency + nbytes / (profile.net_bw * profile.net_share(W))


def _total(parts: dict[str, float]) -> dict[str, float]:
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def _als_compute(p: Problem, profile: DeviceProfile, n: float, rows_solved: float,
                 budget: int) -> dict[str, float]:
    """Seconds of the local work of one ALS sweep over ``n`` ratings (both halves) solving
    ``rows_solved`` rows, at this rank's share of the device."""
    k = p.factors + 1
    s = profile.share(p.workers)
    slots = 2 * n * ALS_PAD
    gram = 2.0 * k * k * slots
    solve = rows_solved * (k ** 3 / 3 + 2 * k * k)
    gathers = 3.0 * 4 * k * slots
    chunks = max(2.0, slots * k / budget) + rows_solved / max(1, budget // (k * k))
    return {"compute": gram / (profile.gemm_flops * s) + solve / (profile.solve_flops * s),
            "memory": gathers / (profile.mem_bw * s),
            "launch": chunks * ALS_OPS_PER_CHUNK * profile.op_overhead}


def _items_als_time(p, profile, n, I_loc, budget):
    W, U, k = p.workers, p.n_users, p.factors + 1
    rows = max(1, USER_BLOCK_BUDGET // (k * k))
    blocks = _ceil_div(U, rows)
    payload = U * (k * k + k) * 4.0
    sent = allreduce_sent(payload, W)
    colls = 2 * blocks if W > 1 else 0
    t = _als_compute(p, profile, n, U + I_loc, budget)  # every rank solves every user
    s = profile.share(W)
    dense = (U + I_loc) * k * 4.0 * 2  # the [q_i, 1] / [p_u, 1] feature copies
    if W > 1:
        dense += payload * 3  # zero the block Grams, add this rank's chunks, read them back
        t["launch"] += blocks * 8 * profile.op_overhead
    t["memory"] += dense / (profile.copy_bw * s)
    t["network"] = _net_time(profile, W, sent, colls)
    return sent, colls, _total(t)


def _sgd_local(p: Problem, profile: DeviceProfile, n: float, steps: int) -> dict[str, float]:
    """Seconds of the local SGD work over ``n`` ratings in ``steps`` steps.

    The steps themselves at the profile's measured :attr:`DeviceProfile.sgd_rate` (one
    thread per rank on a CPU, slowed only when ranks outnumber cores; a GPU each): a
    1024-rating step is dispatch- and scatter-bound, which a flop or bandwidth model
    misjudged by 8× on CPU. Plus what the measured step leaves out: the epoch's shuffle and
    the optimizer's extra row traffic."""
    k = p.factors + 1
    s = profile.share(p.workers)
    threads = 1.0 if profile.cores <= 0 else min(1.0, profile.cores / max(1, p.workers))
    extra = 0.0
    if p.optimizer != "sgd":  # the optimizer touches each rating's rows once more
        extra = n * 4 * k * 4 * (1 + MOMENTS[p.optimizer])
    epoch = n * 8 * 2  # the epoch's randperm (the steps' gathers are in the measured rate)
    return {"steps": n * k / (profile.sgd_rate * threads),
            "memory": extra / (profile.mem_bw * s) + epoch / (profile.copy_bw * s)}


def _items_sgd_time(p, profile, n, I_loc):
    W, U, k = p.workers, p.n_users, p.factors + 1
    steps = max(1, _ceil_div(n, p.batch_size))
    words = _sync_floats_per_step(p)
    sent = allreduce_sent(words * 4.0, W) * steps
    path = _sgd_path(p.optimizer)
    per_step_colls = {"funk": 2, "rowsparse": 3, "autograd": 1}[path] if W > 1 else 0
    colls = steps * per_step_colls + (1 if W > 1 else 0)
    t = _sgd_local(p, profile, n, steps)
    s = profile.share(W)
    dense = 0.0
    if W > 1:
        dense = steps * words * 4.0 * 4  # zero, reduce, add to the table
    if path == "autograd":  # a dense optimizer step over every row, every step
        dense += steps * (U + I_loc) * k * 4.0 * (3 + 2 * MOMENTS[p.optimizer])
    t["memory"] += dense / (profile.copy_bw * s)
    t["network"] = _net_time(profile, W, sent, colls)
    return sent, colls, _total(t)


def _fill_compute(p: Problem, profile: DeviceProfile, users: float, items: float) -> dict[str, float]:
    """Seconds to score ``users × items`` cells (GEMM with the bias column) and keep a top-k."""
    k = p.factors + 1
    s = profile.share(p.workers)
    cells = float(users) * float(items)
    return {"compute": 2.0 * k * cells / (profile.gemm_flops * s),
            "memory": cells * 8.0 / (profile.copy_bw * s)}


def _fill_tiles(p: Problem, profile: DeviceProfile, users: float, items: float,
                held: float) -> float:
    """Bytes of the fill's score tiles: the CPU budget, or on a GPU 60% of what the ``held``
    tables leave free (kernels.fill), never more than the whole ``users × items`` block."""
    need = float(users) * float(items) * 16
    if profile.cores > 0:
        return min(need, FILL_CPU_BUDGET)
    return min(need, max(0.0, 0.6 * (profile.memory_bytes - held)))


def _items_fill(p: Problem, profile: DeviceProfile, I_loc: int, held: float):
    W, U = p.workers, p.n_users
    sent = (W - 1) / W * U * p.topk * 12.0
    t = _fill_compute(p, profile, U, I_loc)
    blocks = max(1, _ceil_div(U, 65536))
    t["network"] = _net_time(profile, W, sent, 2 * blocks)
    return sent, _total(t), _fill_tiles(p, profile, U, I_loc, held)


# -- the grid layout ------------------------------------------------------------------------------------

def grid_estimate(p: Problem, profile: DeviceProfile) -> Estimate:
    """The 2-D layout: each rank holds ⌈U/W⌉ rows of P, ⌈I/W⌉ rows of Q, and its ratings
    twice (by user block and by item block)."""
    p.check()
    W, d = p.workers, p.factors
    k = d + 1
    U_loc, I_loc = _ceil_div(p.n_users, W), _ceil_div(p.n_items, W)
    n = p.n_ratings / W
    mem: dict[str, float] = {"user table (block)": U_loc * k * 4.0,
                             "item table (block)": I_loc * k * 4.0,
                             "runtime": RUNTIME_CPU if profile.cores > 0 else RUNTIME_GPU}
    # GridShard's by_user and by_item (int64, int64, float32 on the host); at W = 1
    # route_ratings is the identity: one int64 copy of the ids, the float32 ratings shared
    mem["ratings, by user + by item (host)"] = 2 * n * 20.0 if W > 1 else n * 16.0
    notes = []
    if p.solver == "als":
        budget = als_budget(p, profile)
        need_i, need_u = grid_needed_rows(p)
        own_i = expected_distinct(p.n_items, n, p.zipf) / W if W > 1 else p.n_items
        own_u = expected_distinct(p.n_users, n, p.user_skew) / W if W > 1 else p.n_users
        # each half's BlockSide (int64 rows and cols, float32 ratings on the device; on a CPU
        # the float32 ratings are the host's)
        mem["ratings, block sides"] = 2 * n * (16.0 if profile.cores > 0 else 20.0)
        mem["ALS plan"] = 2 * n * ALS_PAD * 8.0
        mem["rating counts"] = (U_loc + I_loc) * 8.0
        fetched = max(need_i + own_i, need_u + own_u)
        # the fetched rows with the rows this rank sends (during the all-to-all), or with
        # their [x, 1] feature copy (during the solve)
        mem["ALS transient"] = _chunk_bytes(n, k, budget) + fetched * k * 4.0 * 2
        sent = (need_i + need_u) * k * 4.0
        colls = 2 if W > 1 else 0
        t = _als_compute(p, profile, n, U_loc + I_loc, budget)
        s = profile.share(W)
        t["memory"] += (fetched * 2 + U_loc + I_loc) * k * 4.0 * 2 / (profile.copy_bw * s)
        t["network"] = _net_time(profile, W, sent, colls)
        t = _total(t)
    else:
        # DSGDSolver's blocks (by item block: int64, int64, float32 copies) and its
        # train-metrics sample (the blocks again, up to metrics_sample ratings in all)
        mem["ratings, item-block buckets"] = n * 20.0
        mem["ratings, metrics sample"] = min(n, p.metrics_sample / W) * 20.0
        # the user block's optimizer state and the held item block's (the visiting one
        # replaces the own one in the ring); row-sparse scratch of both (gradient sums, marks)
        path = _grid_sgd_path(p.optimizer)
        mem.update(_optimizer_memory(U_loc + I_loc, k, p.optimizer, path))
        mem["shift buffer"] = I_loc * k * 4.0 * (1 + MOMENTS[p.optimizer])
        mem["epoch order"] = n * 8.0 / W  # one block's int64 permutation at a time
        sent = (p.n_items * k * 4.0 * (1 + MOMENTS[p.optimizer])) if W > 1 else 0.0
        colls = 2 * W if W > 1 else 0  # a header and a payload exchange per shift
        steps = W * max(1, _ceil_div(n / W, p.batch_size))
        t = _sgd_local(p, profile, n, steps)  # row-sparse: no dense step over the tables
        t["network"] = _net_time(profile, W, sent, colls)
        t = _total(t)
        notes.append("grid + sgd = DSGD (Gemulla et al. 2011): W sub-epochs, item blocks shift"
                     + (" with their Adagrad sums" if p.optimizer == "adagrad" else ""))
        if p.optimizer not in GRID_OPTIMIZERS:
            notes.append(f"the grid's DSGD runs optimizer {' or '.join(GRID_OPTIMIZERS)}, not "
                         f"{p.optimizer} (Adam's step counts do not decompose into blocks); "
                         "priced as a row-sparse step with its moments")
    fill_sent = (W - 1) / W * p.n_items * k * 4.0
    ft = _fill_compute(p, profile, U_loc, p.n_items)
    ft["network"] = _net_time(profile, W, fill_sent, 2 * (W - 1))
    held = (mem["user table (block)"] + 2 * mem["item table (block)"]  # own + visiting block
            + U_loc * p.topk * 12.0 * 2 + mem["runtime"])  # running top-k and a merge's output
    tiles = _fill_tiles(p, profile, U_loc, I_loc, held)
    fill_mem, fill_need = held + tiles, held + min(tiles, MIN_FILL_TILES)
    return Estimate("grid", mem, profile.memory_per_rank(W), sent, colls, fill_sent, t,
                    _total(ft), fill_mem, fill_need, notes, host_separate=profile.cores <= 0)


def cpu_seconds(e: Estimate, profile: DeviceProfile, workers: int) -> float:
    """CPU seconds one rank's process spends per sweep/epoch on a CPU profile (what
    ``time.process_time`` counts, summed over its threads): its compute and memory time on
    its ``cores / W`` cores, its single-threaded launches, and the loopback copies of the
    bytes it sends. Unlike wall time, other processes' load does not inflate it."""
    t = e.sweep_time
    cores = profile.cores / max(1, workers) if profile.cores > 0 else 1.0
    return ((t.get("compute", 0.0) + t.get("memory", 0.0)) * cores + t.get("launch", 0.0)
            + t.get("steps", 0.0) + e.sweep_bytes / profile.net_bw)


def estimate(p: Problem, profile: DeviceProfile, layout: str) -> Estimate:
    """The :class:`Estimate` of ``layout`` (``items`` or ``grid``)."""
    if layout == "items":
        return items_estimate(p, profile)
    if layout == "grid":
        return grid_estimate(p, profile)
    raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


# -- the table ----------------------------------------------------------------------------------------

def fmt_bytes(b: float) -> str:
    """``b`` bytes in binary units (B, KiB, MiB, GiB, TiB)."""
    b = float(b)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(b) < 1024 or unit == "PiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    raise AssertionError  # pragma: no cover


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fit_line(e: Estimate) -> str:
    need = max(e.memory_total, e.fill_needed)
    word = "fits" if e.fits else "does NOT fit"
    return f"{word} (needs {fmt_bytes(need)}, has {fmt_bytes(e.capacity)})"


def render(p: Problem, profile: DeviceProfile, estimates: list[Estimate]) -> str:
    """The side-by-side table ``svdfill plan`` prints."""
    unit = "sweep" if p.solver == "als" else "epoch"
    method = "ALS" if p.solver == "als" else ("DSGD/SGD" if p.optimizer == "sgd" else f"SGD+{p.optimizer}")
    head = (f"plan: {p.n_users:,} users x {p.n_items:,} items x {p.n_ratings:,} ratings, d={p.factors}, "
            f"W={p.workers}, {method}, device {profile.name} "
            f"(zipf {p.zipf}, user_skew {p.user_skew}; per rank)")
    rows: list[tuple[str, list[str]]] = []
    parts = []
    for e in estimates:
        for kname in e.memory:
            if kname not in parts:
                parts.append(kname)
    for kname in parts:
        rows.append((f"memory: {kname}", [fmt_bytes(e.memory[kname]) if kname in e.memory else "-"
                                          for e in estimates]))
    rows.append(("memory: total (train)", [fmt_bytes(e.memory_total) for e in estimates]))
    rows.append(("memory: fill (uses / needs)", [f"{fmt_bytes(e.fill_memory)} / {fmt_bytes(e.fill_needed)}"
                                                  for e in estimates]))
    rows.append((f"bytes sent per {unit}", [fmt_bytes(e.sweep_bytes) for e in estimates]))
    rows.append((f"collectives per {unit}", [f"{e.sweep_collectives:,}" for e in estimates]))
    rows.append(("bytes sent by the fill", [fmt_bytes(e.fill_bytes) for e in estimates]))
    for part in ("compute", "memory", "launch", "steps", "network", "total"):
        if part == "steps" and not any("steps" in e.sweep_time for e in estimates):
            continue  # only SGD has measured steps
        rows.append((f"time per {unit}: {part}", [fmt_seconds(e.sweep_time.get(part, 0.0)) for e in estimates]))
    for part in ("compute", "memory", "network", "total"):
        rows.append((f"time of the fill: {part}", [fmt_seconds(e.fill_time.get(part, 0.0)) for e in estimates]))
    rows.append(("fits?", [fit_line(e) for e in estimates]))
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(e.layout), *(len(r[1][j]) for r in rows)) for j, e in enumerate(estimates)]
    lines = [head, "", "  ".join([" " * w0] + [e.layout.ljust(w) for e, w in zip(estimates, widths)])]
    lines.append("  ".join(["-" * w0] + ["-" * w for w in widths]))
    for name, vals in rows:
        lines.append("  ".join([name.ljust(w0)] + [v.ljust(w) for v, w in zip(vals, widths)]).rstrip())
    for e in estimates:
        for note in e.notes:
            lines.append(f"note ({e.layout}): {note}")
    fitting = [e for e in estimates if e.fits]
    if fitting:
        best = min(fitting, key=lambda e: e.sweep_time["total"])
        lines.append(f"verdict: {', '.join(e.layout for e in fitting)} fit(s); fastest that fits: "
                     f"{best.layout} ({fmt_seconds(best.sweep_time['total'])} per {unit})")
    else:
        lines.append("verdict: no layout fits; add workers or memory")
    return "\n".join(lines)
