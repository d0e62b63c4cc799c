"""The 2-D ("grid") layout: every rank owns one block of users and one block of items.

W ranks; users are cut into W contiguous blocks ``user_bounds[r] = (u_lo, u_hi)`` and
items into W contiguous blocks ``item_bounds[r] = (i_lo, i_hi)`` (contiguous ids of the
world's IdMap). Rank r holds the P rows and b_u of user block r, the Q rows and b_i of item
block r, and two views of the ratings: ``by_user`` (every rating of its users, global ids)
and ``by_item`` (every rating of its items). No rank holds a full P, Q or the ratings: per
rank ``(U + I)/W`` table rows and ``2N/W`` ratings (balanced blocks), the 1/W of the issue.

Moving the other side's rows (:class:`RowExchange`). A half-sweep of rank r over
``by_user`` needs ``[q_i, b_i]`` of every item its users rated. These rows live on their
owners; one ``all_to_all`` moves exactly them. The byte model (float32 tables, ``d``
factors, each row ``[q_i, b_i]`` = ``(d + 1)`` float32 = ``4(d + 1)`` bytes)::

    I_r      = distinct items in rank r's by_user           (needed by the user half-sweep)
    U_r      = distinct users in rank r's by_item           (needed by the item half-sweep)
    B^I_s    = item block of rank s,  B^U_s = user block of rank s

    user half-sweep:  recv_r = 4(d+1) · |I_r \\ B^I_r|
                      sent_s = 4(d+1) · Σ_{r ≠ s} |I_r ∩ B^I_s|
    item half-sweep:  recv_r = 4(d+1) · |U_r \\ B^U_r|
                      sent_s = 4(d+1) · Σ_{r ≠ s} |U_r ∩ B^U_s|
    one ALS sweep:    the sum of both half-sweeps.

The rows a rank keeps for itself (``I_r ∩ B^I_r``) are copied locally and are not
counted; the split sizes are exchanged once, when the exchange is built (``8·W`` bytes,
plus ``8`` bytes per requested id, sent to its owner), never per sweep, so a sweep sends
nothing but rows. Evaluation fetches rows the same way (validation items of the user
block), counted on its own exchange.

Why an all-to-all of the needed rows rather than rotating whole shards around a ring: a
ring half-sweep sends every rank's whole block to every other rank, ``4(d+1)·(I − |B^I_r|)``
bytes received per rank, in W − 1 dependent steps; the needed rows are a subset of that
(``|I_r \\ B^I_r| ≤ I − |B^I_r|``, equal only when rank r's users rated every item) and
travel in one collective. How much smaller depends on W and the density: a user with n
ratings spread evenly is needed by an item block with probability ``1 − (1 − 1/W)^n``, so at
small W with active users nearly every row is needed anyway (ML-1M, W = 4, d = 32: 939,840
bytes received by rank 0 per sweep against 960,432 by a ring, −2%; n = 10 ratings a user at
W = 4: 94% of the users needed), while at W = 64 the same users are needed 15% of the time.
Measured on a synthetic 2M users × 50k items × 18M training ratings, d = 16: 68.8 MB
received by rank 0 per sweep at W = 2 (ring: 70.0 MB), 89.1 MB at W = 4 (ring: 104.6 MB).
The all-to-all never moves more bytes than the ring, and it is one step instead of W − 1
either way. (DSGD, which updates both sides of a block at once, rotates instead:
:mod:`svdfill.distributed.ring`.) :func:`sweep_bytes` evaluates the model from the ratings;
the counters of :class:`RowExchange` measure it (equal, tests/test_grid.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(users int64 [n], items int64 [n], ratings float32 [n])``, global ids."""


def grid_bounds(n: int, W: int, counts: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """``W`` contiguous blocks ``[(lo, hi), ...]`` covering ``[0, n)``.

    counts: int [n] ratings per id; the cut then minimises the largest block's rating count
    (:func:`svdfill.distributed.sharding.balanced_shards`; every block non-empty, needs
    ``n ≥ W``). ``None``: blocks of ``⌈n/W⌉`` or ``⌊n/W⌋`` ids (empty ones when ``n < W``).
    """
    if W < 1:
        raise ValueError(f"grid_bounds: W must be >= 1, got {W}")
    if counts is not None:
        from svdfill.distributed.sharding import balanced_shards

        if len(counts) != n:
            raise ValueError(f"grid_bounds: {len(counts)} counts for {n} ids")
        if n >= W:
            return balanced_shards(counts, W)
    cuts = [(n * r) // W for r in range(W + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(W)]


def _owner(ids: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    ends = torch.tensor([hi for _, hi in bounds[:-1]], dtype=torch.int64)
    return torch.bucketize(ids.to(torch.int64).cpu(), ends, right=True).to(ids.device)


@dataclass
class GridLayout:
    """Who owns which users and items. ``user_bounds[r]``/``item_bounds[r]``: rank r's
    contiguous blocks ``(lo, hi)``; W = ``len(user_bounds)`` = ``len(item_bounds)``."""

    n_users: int
    n_items: int
    user_bounds: list[tuple[int, int]]
    item_bounds: list[tuple[int, int]]

    def __post_init__(self) -> None:
        self.user_bounds = [(int(a), int(b)) for a, b in self.user_bounds]
        self.item_bounds = [(int(a), int(b)) for a, b in self.item_bounds]
        for name, bounds, n in (("user", self.user_bounds, self.n_users),
                                ("item", self.item_bounds, self.n_items)):
            if not bounds or bounds[0][0] != 0 or bounds[-1][1] != n or any(
                    a > b for a, b in bounds) or any(
                    bounds[r][1] != bounds[r + 1][0] for r in range(len(bounds) - 1)):
                raise ValueError(f"GridLayout: {name} bounds {bounds} do not tile [0, {n})")
        if len(self.user_bounds) != len(self.item_bounds):
            raise ValueError("GridLayout: as many user blocks as item blocks")

    @property
    def world_size(self) -> int:
        return len(self.user_bounds)

    def user_owner(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 rank owning each user id."""
        return _owner(ids, self.user_bounds)

    def item_owner(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 rank owning each item id."""
        return _owner(ids, self.item_bounds)

    def to_record(self) -> dict:
        """JSON-able record (the layout record of grid checkpoints)."""
        return {"format": "svdfill-grid-layout/1", "n_users": self.n_users,
                "n_items": self.n_items, "world_size": self.world_size,
                "user_bounds": [list(b) for b in self.user_bounds],
                "item_bounds": [list(b) for b in self.item_bounds]}

    @classmethod
    def from_record(cls, d: dict) -> "GridLayout":
        if not isinstance(d, dict) or d.get("format") != "svdfill-grid-layout/1":
            raise ValueError("not a grid layout record (format svdfill-grid-layout/1)")
        return cls(int(d["n_users"]), int(d["n_items"]),
                   [tuple(b) for b in d["user_bounds"]], [tuple(b) for b in d["item_bounds"]])


@dataclass
class GridShard:
    """What rank ``rank`` of ``size`` trains on: ``by_user`` = the ratings of its user
    block, ``by_item`` = the ratings of its item block, ``val_by_user`` = the validation
    ratings of its user block (each a :data:`Triple`, global ids, on CPU)."""

    layout: GridLayout
    rank: int
    size: int
    by_user: Triple
    by_item: Triple
    val_by_user: Triple
    bytes_routed: int = 0
    """Bytes this rank sent to other ranks while routing the ratings (train and val)."""

    @property
    def user_block(self) -> tuple[int, int]:
        return self.layout.user_bounds[self.rank]

    @property
    def item_block(self) -> tuple[int, int]:
        return self.layout.item_bounds[self.rank]

    def tensor_bytes(self) -> int:
        """Bytes of the ratings this rank holds (both views and validation)."""
        return sum(t.numel() * t.element_size()
                   for tr in (self.by_user, self.by_item, self.val_by_user) for t in tr)


# -- collectives -------------------------------------------------------------------------------

def _comm(world) -> torch.device:
    return getattr(world, "comm_device", torch.device("cpu"))


def _split_exchange(world, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
                    ) -> torch.Tensor:
    """``all_to_all_single`` of ``send`` (rows grouped by destination rank, ``send_counts``
    each) into ``sum(recv_counts)`` rows; identity at W = 1."""
    if world.world_size == 1:
        return send
    comm = _comm(world)
    src = send.to(comm).contiguous()
    out = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=comm)
    dist.all_to_all_single(out, src, output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return out.to(send.device)


def _counts_exchange(world, send_counts: torch.Tensor) -> list[int]:
    if world.world_size == 1:
        return send_counts.tolist()
    comm = _comm(world)
    sc = send_counts.to(comm, torch.int64)
    rc = torch.empty_like(sc)
    dist.all_to_all_single(rc, sc)
    return rc.cpu().tolist()


def _sent_elsewhere(world, counts: list[int], row_bytes: int) -> int:
    return sum(c for r, c in enumerate(counts) if r != world.rank) * row_bytes


def route(world, dest: torch.Tensor, columns: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Send element j of every column to rank ``dest[j]`` (one all-to-all per column).
    Returns the columns received (from rank 0's first, each sender's in its order) and the
    bytes sent to other ranks. CPU tensors [n]."""
    W = world.world_size
    if W == 1:
        return list(columns), 0
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=W)
    recv = _counts_exchange(world, send)
    send = send.tolist()
    out, sent = [], 0
    for col in columns:
        out.append(_split_exchange(world, col[order], send, recv))
        sent += _sent_elsewhere(world, send, col.element_size())
    return out, sent


def route_ratings(world, layout: GridLayout, users: torch.Tensor, items: torch.Tensor,
                  ratings: torch.Tensor) -> tuple[Triple, Triple]:
    """``(by_user, by_item)`` of this rank from whatever share of the ratings it holds
    (every rating held by exactly one rank): one all-to-all (per column) by the user's
    owner, one by the item's. int64 ids, float32 ratings, CPU. Every rank must call it."""
    by_user, by_item, _ = route_ratings_counted(world, layout, users, items, ratings)
    return by_user, by_item


def route_ratings_counted(world, layout: GridLayout, users: torch.Tensor, items: torch.Tensor,
                          ratings: torch.Tensor) -> tuple[Triple, Triple, int]:
    """:func:`route_ratings` and the bytes this rank sent to other ranks doing it."""
    u = users.to(torch.int64).cpu()
    i = items.to(torch.int64).cpu()
    r = ratings.to(torch.float32).cpu()
    by_user, b1 = route(world, layout.user_owner(u), [u, i, r])
    by_item, b2 = route(world, layout.item_owner(i), [u, i, r])
    return tuple(by_user), tuple(by_item), b1 + b2


# -- the row exchange --------------------------------------------------------------------------

@dataclass
class RowExchange:
    """Fetch the rows of a block-distributed table that this rank needs.

    Built once (a collective) from ``needed`` (int64 [m], sorted distinct global ids of the
    other side) and the owners' ``bounds``; every :meth:`fetch` then moves exactly those
    rows in one ``all_to_all_single``. ``bytes_sent`` / ``bytes_received`` count the rows
    that crossed to / from other ranks over all fetches (``rows · c · 4`` for a float32
    table of ``c`` columns); ``fetches`` counts the calls.
    """

    world: object
    needed: torch.Tensor
    bounds: list[tuple[int, int]]
    recv_counts: list[int] = field(init=False)
    send_counts: list[int] = field(init=False)
    send_rows: torch.Tensor = field(init=False)
    bytes_sent: int = 0
    bytes_received: int = 0
    fetches: int = 0

    def __post_init__(self) -> None:
        w = self.world
        need = self.needed.to(torch.int64).cpu()
        if need.numel() > 1 and not bool((need[1:] > need[:-1]).all()):
            raise ValueError("RowExchange: needed ids must be sorted and distinct")
        self.needed = need
        owner = _owner(need, self.bounds)
        # sorted ids of contiguous blocks are already grouped by owner, in rank order
        self.recv_counts = torch.bincount(owner, minlength=w.world_size).tolist()
        self.send_counts = _counts_exchange(w, torch.tensor(self.recv_counts, dtype=torch.int64))
        # each owner learns which of its rows go to whom (ids → rows of its own block)
        asked = _split_exchange(w, need, self.recv_counts, self.send_counts)
        self.send_rows = asked - self.bounds[w.rank][0]

    def fetch(self, local_table: torch.Tensor) -> torch.Tensor:
        """``local_table [rows_owned, c]`` (this rank's block of the table) → the needed rows
        ``[m, c]`` in the order of ``needed``. Collective: every rank calls it together."""
        rows = local_table.index_select(0, self.send_rows.to(local_table.device))
        out = _split_exchange(self.world, rows, self.send_counts, self.recv_counts)
        per_row = local_table.element_size() * (local_table.shape[1] if local_table.dim() > 1 else 1)
        self.bytes_sent += _sent_elsewhere(self.world, self.send_counts, per_row)
        self.bytes_received += _sent_elsewhere(self.world, self.recv_counts, per_row)
        self.fetches += 1
        return out

    def rows_moved(self) -> tuple[int, int]:
        """``(rows sent to other ranks, rows received from other ranks)`` per fetch."""
        r = self.world.rank
        return (sum(c for s, c in enumerate(self.send_counts) if s != r),
                sum(c for s, c in enumerate(self.recv_counts) if s != r))


def needed_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted distinct ids int64 [m], position of each id in them int64 [n])``: the rows a
    half-sweep fetches and the ratings' column index into the fetched table."""
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    uniq, inv = torch.unique(ids.to(torch.int64), sorted=True, return_inverse=True)
    return uniq, inv


def sweep_bytes(layout: GridLayout, users: torch.Tensor, items: torch.Tensor, d: int
                ) -> tuple[list[int], list[int]]:
    """The module's byte model of one ALS sweep from the whole training ratings (a planner's
    or a test's view; no rank calls it): ``(sent[W], received[W])`` bytes per rank, float32
    rows of ``d + 1``. ``users``/``items``: int [n] global ids."""
    u = torch.as_tensor(users).to(torch.int64).cpu()
    i = torch.as_tensor(items).to(torch.int64).cpu()
    W = layout.world_size
    sent, recv = [0] * W, [0] * W
    row = 4 * (d + 1)
    # a needed row is a distinct (requesting rank, id) pair whose id another rank owns
    for req_of, ids, own_of, n in ((layout.user_owner(u), i, layout.item_owner, layout.n_items),
                                   (layout.item_owner(i), u, layout.user_owner, layout.n_users)):
        pairs = torch.unique(req_of * max(n, 1) + ids)
        req, owner = pairs // max(n, 1), own_of(pairs % max(n, 1))
        away = req != owner
        for r, c in zip(*torch.unique(req[away], return_counts=True)):
            recv[int(r)] += int(c) * row
        for s, c in zip(*torch.unique(owner[away], return_counts=True)):
            sent[int(s)] += int(c) * row
    return sent, recv
