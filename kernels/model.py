"""Biased matrix factorization r̂(u, i) = μ + b_u + b_i + p_u·q_i as a torch module.

The module only holds the tables and computes predictions; how they are updated (Funk SGD
without autograd, torch optimizers, ALS) is the trainer's choice. Its item tables may hold
only a shard ``[item_offset, item_offset + n_items)`` of the catalogue (distributed
training); item indices given to it are then local to the shard.
"""

from __future__ import annotations

import torch
from torch import nn

USER_PARAMS = ("user_factors", "user_bias")
"""The replicated user tables: every rank holds all rows (DDP or summed deltas keep them equal)."""
ITEM_PARAMS = ("item_factors", "item_bias")
"""The item tables: a rank holds only its shard's rows."""
PARAMS = ("user_factors", "item_factors", "user_bias", "item_bias")
"""The trained parameters, in the order optimizers and checkpoints list them."""
STATE_KEYS = PARAMS + ("global_mean",)
"""The checkpoint keys of a model, exactly (ARCHITECTURE.md)."""

INIT_CHUNK_ROWS = 4096
"""Rows drawn from one seeded generator at init: any row range can be drawn on its own."""

_USER_TABLE, _ITEM_TABLE = 1, 2


def init_rows(lo: int, hi: int, d: int, *, std: float, seed: int, table: int) -> torch.Tensor:
    """Normal(0, std) init of rows ``[lo, hi)`` of a table, float32 [hi-lo, d] on CPU.

    Row r comes from the generator of chunk ``r // INIT_CHUNK_ROWS`` (seeded by
    ``(seed, table, chunk)``), so a shard drawn alone equals the same rows of the full table
    drawn at once: initialization does not depend on the world size.
    """
    if hi <= lo or d == 0 or std == 0:
        return torch.zeros(max(hi - lo, 0), d, dtype=torch.float32)
    out = torch.empty(hi - lo, d, dtype=torch.float32)
    g = torch.Generator()
    for c in range(lo // INIT_CHUNK_ROWS, (hi - 1) // INIT_CHUNK_ROWS + 1):
        c_lo = c * INIT_CHUNK_ROWS
        g.manual_seed((int(seed) * 1_000_003 + table * 7_919 + c * 104_729) % (2**63 - 1))
        block = torch.randn(INIT_CHUNK_ROWS, d, generator=g) * std
        a, b = max(lo, c_lo), min(hi, c_lo + INIT_CHUNK_ROWS)
        out[a - lo:b - lo] = block[a - c_lo:b - c_lo]
    return out


class _SparseRows(torch.autograd.Function):
    """``weight[idx]`` whose gradient w.r.t. ``weight`` is a sparse COO tensor (what
    ``nn.Embedding(sparse=True)`` produces), for 1-d bias vectors as well as 2-d tables."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape = weight.shape
        return weight.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        # indices come from index_select's valid rows: skip the invariant check's cost
        g = torch.sparse_coo_tensor(idx.unsqueeze(0), grad.contiguous(), ctx.shape,
                                    device=grad.device, check_invariants=False)
        return g, None


def predict_chunk(device: torch.device | str, d: int) -> int:
    """Pairs per chunk of :meth:`BiasedMF.predict`. On the CPU the chunk's two gathered
    ``[chunk, d]`` float32 blocks stay near 1 MiB, so they are multiplied and summed while
    still in cache: measured on 900k ML-1M pairs (2 cores), d = 32 went from 140 ms with
    4M-pair chunks to 17 ms, d = 128 on 2M pairs from 1.56 s to 0.19 s. On a GPU one chunk
    of 4M pairs keeps the launches few."""
    if torch.device(device).type == "cpu":
        return max(4096, (1 << 18) // max(int(d), 1))
    return 1 << 22


class BiasedMF(nn.Module):
    """Parameters ``user_factors`` float32 [U, d], ``item_factors`` [I, d], ``user_bias`` [U],
    ``item_bias`` [I]; buffer ``global_mean`` (0-d float32, μ, not trained).

    Init: factors normal(0, ``init_std``) drawn per :func:`init_rows` (item rows of a shard
    equal the same rows of the full table), biases zero, μ = ``global_mean``.
    ``sparse=True`` makes backward produce sparse COO gradients (for SparseAdam, and for
    DDP with gloo's sparse all-reduce).
    """

    def __init__(self, n_users: int, n_items: int, factors: int, *, init_std: float = 0.01,
                 global_mean: float = 0.0, seed: int = 0, item_offset: int = 0,
                 sparse: bool = False):
        super().__init__()
        self.item_offset = int(item_offset)
        self.sparse = bool(sparse)
        self.user_factors = nn.Parameter(init_rows(0, n_users, factors, std=init_std, seed=seed,
                                                   table=_USER_TABLE))
        self.item_factors = nn.Parameter(init_rows(item_offset, item_offset + n_items, factors,
                                                   std=init_std, seed=seed, table=_ITEM_TABLE))
        self.user_bias = nn.Parameter(torch.zeros(n_users))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.register_buffer("global_mean", torch.tensor(float(global_mean), dtype=torch.float32))

    @property
    def n_users(self) -> int:
        return int(self.user_factors.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    @property
    def factors(self) -> int:
        return int(self.user_factors.shape[1])

    def _rows(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _SparseRows.apply(w, idx) if self.sparse else w.index_select(0, idx)

    def forward(self, users: torch.Tensor, items: torch.Tensor,
                reg: tuple[float, float] | None = None):
        """Predictions float32 [n] for int64 ``users`` [n] and shard-local ``items`` [n]
        (differentiable).

        With ``reg = (λ_f, λ_b)`` returns ``(pred, penalty)`` where ``penalty`` (0-d) is
        ``Σ_batch λ_f(‖p_u‖² + ‖q_i‖²) + λ_b(b_u² + b_i²)``: the Funk-SVD L2 term, applied
        once per rating occurrence to the rows the batch touches, computed from the same
        gathered rows (one gather, and it runs inside DDP's forward).
        """
        users = users.long()
        items = items.long()
        p = self._rows(self.user_factors, users)
        q = self._rows(self.item_factors, items)
        b_u = self._rows(self.user_bias, users)
        b_i = self._rows(self.item_bias, items)
        pred = self.global_mean + b_u + b_i + (p * q).sum(1)
        if reg is None:
            return pred
        lf, lb = reg
        penalty = lf * ((p * p).sum() + (q * q).sum()) + lb * ((b_u * b_u).sum() + (b_i * b_i).sum())
        return pred, penalty

    @torch.no_grad()
    def predict(self, users: torch.Tensor, items: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
        """Predictions float32 [n] without autograd for int ``users``/``items`` [n], in
        chunks of ``chunk`` pairs (``None``: :func:`predict_chunk` for the model's device).
        The chunk changes the speed, never the result: each row's dot product is reduced
        alone."""
        dev = self.user_factors.device
        users = users.to(dev)
        items = items.to(dev)
        if chunk is None:
            chunk = predict_chunk(dev, self.user_factors.shape[1])
        out = torch.empty(users.shape[0], dtype=torch.float32, device=dev)
        for s in range(0, users.shape[0], chunk):
            u = users[s:s + chunk].long()
            i = items[s:s + chunk].long()
            # index_select: about twice as fast as advanced indexing for row gathers on CPU
            dot = (self.user_factors.index_select(0, u) * self.item_factors.index_select(0, i)).sum(1)
            out[s:s + chunk] = (self.global_mean + self.user_bias.index_select(0, u)
                                + self.item_bias.index_select(0, i) + dot)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The five checkpoint tensors (detached views, on the model's device)."""
        return {k: getattr(self, k).detach() for k in STATE_KEYS}

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the five tensors of ``state`` in place (shapes must match)."""
        for k in STATE_KEYS:
            getattr(self, k).copy_(state[k])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                   *, item_offset: int = 0, sparse: bool = False) -> "BiasedMF":
        """A model holding ``state``'s tensors (copied to ``device``)."""
        U, d = state["user_factors"].shape
        m = cls(U, state["item_factors"].shape[0], d, init_std=0.0,
                global_mean=float(state["global_mean"]), item_offset=item_offset, sparse=sparse)
        m.load_state_tensors(state)
        return m.to(device)
