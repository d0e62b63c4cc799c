"""Encoded ratings as torch tensors, and the one call that turns ``cfg.data`` into them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from svdfill.data.errors import DataError
from svdfill.data.idmap import IdMap
from svdfill.data.readers import RawRatings


@dataclass
class Ratings:
    """(user, item, rating) triples with contiguous ids.

    users: int32 [n] in ``0..n_users-1``; items: int32 [n] in ``0..n_items-1``;
    ratings: float32 [n]. CPU tensors unless moved with :meth:`to`. ``n_users``/``n_items``
    are the sizes of the id space (the model's table sizes), not the distinct ids present:
    a split's halves keep the full sizes. timestamps: int64 [n] Unix seconds, or None (read
    only for ``data.split = "time"``); :meth:`subset`, :meth:`cat` and :meth:`to` carry them.
    """

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    n_users: int
    n_items: int
    timestamps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.ratings.shape[0]
        if self.users.shape != (n,) or self.items.shape != (n,) or self.ratings.dim() != 1:
            raise ValueError(f"Ratings: users {tuple(self.users.shape)}, items "
                             f"{tuple(self.items.shape)}, ratings {tuple(self.ratings.shape)} must be [n]")
        if self.timestamps is not None and self.timestamps.shape != (n,):
            raise ValueError(f"Ratings: timestamps {tuple(self.timestamps.shape)} must be [{n}]")

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    @property
    def device(self) -> torch.device:
        return self.ratings.device

    def to(self, device: Any) -> "Ratings":
        """The same ratings on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.ratings.device == device:
            return self
        return Ratings(self.users.to(device), self.items.to(device), self.ratings.to(device),
                       self.n_users, self.n_items,
                       None if self.timestamps is None else self.timestamps.to(device))

    def subset(self, index: torch.Tensor | np.ndarray) -> "Ratings":
        """Rows ``index`` (int64 indices or a bool mask [n]); id-space sizes unchanged."""
        index = torch.as_tensor(index, device=self.ratings.device)
        return Ratings(self.users[index], self.items[index], self.ratings[index],
                       self.n_users, self.n_items,
                       None if self.timestamps is None else self.timestamps[index])

    def cat(self, other: "Ratings") -> "Ratings":
        """``self`` followed by ``other`` (e.g. train + validation for a refit); timestamps
        kept when both have them, else None."""
        if (other.n_users, other.n_items) != (self.n_users, self.n_items):
            raise ValueError("Ratings.cat: id spaces differ")
        ts = (torch.cat([self.timestamps, other.timestamps])
              if self.timestamps is not None and other.timestamps is not None else None)
        return Ratings(torch.cat([self.users, other.users]), torch.cat([self.items, other.items]),
                       torch.cat([self.ratings, other.ratings]), self.n_users, self.n_items, ts)

    def mean(self) -> float:
        """Global mean rating μ (float64 accumulation); NaN when empty."""
        if len(self) == 0:
            return math.nan
        return float(self.ratings.to(torch.float64).mean())

    @classmethod
    def from_arrays(cls, users: Any, items: Any, ratings: Any, n_users: int | None = None,
                    n_items: int | None = None) -> "Ratings":
        """From any int/float arrays or tensors (sizes default to max id + 1)."""
        u = torch.as_tensor(np.asarray(users) if not isinstance(users, torch.Tensor) else users).to(torch.int32)
        i = torch.as_tensor(np.asarray(items) if not isinstance(items, torch.Tensor) else items).to(torch.int32)
        r = torch.as_tensor(np.asarray(ratings) if not isinstance(ratings, torch.Tensor) else ratings).to(torch.float32)
        nu = int(u.max()) + 1 if n_users is None and len(u) else int(n_users or 0)
        ni = int(i.max()) + 1 if n_items is None and len(i) else int(n_items or 0)
        return cls(u, i, r, nu, ni)


def encode(raw: RawRatings, idmap: IdMap | None = None) -> tuple[Ratings, IdMap]:
    """Contiguous-id :class:`Ratings` of ``raw`` and the map used.

    Without ``idmap`` a new one is built from ``raw``. With one (e.g. a trained model's),
    pairs whose user or item is unknown to it are dropped; use ``idmap.encode_*`` directly
    to count or keep them.
    """
    if idmap is None:
        idmap, uc, ic = IdMap.build_encoded(raw)
        keep = None
    else:
        uc, ic = idmap.encode_users(raw.users), idmap.encode_items(raw.items)
        keep = (uc >= 0) & (ic >= 0)
    ratings = np.asarray(raw.ratings, dtype=np.float32)
    ts = raw.timestamps
    if keep is not None and not keep.all():
        uc, ic, ratings = uc[keep], ic[keep], ratings[keep]
        ts = ts[keep] if ts is not None else None
    if idmap.n_users >= 2**31 or idmap.n_items >= 2**31:
        raise ValueError("more than 2^31 users or items do not fit int32 ids")
    out = Ratings(torch.from_numpy(uc.astype(np.int32)), torch.from_numpy(ic.astype(np.int32)),
                  torch.from_numpy(np.ascontiguousarray(ratings)), idmap.n_users, idmap.n_items,
                  None if ts is None else torch.from_numpy(np.ascontiguousarray(ts, dtype=np.int64)))
    return out, idmap


def read_raw(data_cfg: Any) -> RawRatings:
    """The raw ratings ``cfg.data`` points to: the file at ``path`` (resolved with
    :func:`svdfill.config.resolve_data_path`) or, when ``path`` is empty, the synthetic
    preset ``data_cfg.synthetic``. Timestamps are read only for ``split = "time"``."""
    from svdfill.config import resolve_data_path

    timestamps = getattr(data_cfg, "split", "random") == "time"
    if not data_cfg.path:
        from svdfill.data.synth import generate

        if timestamps:
            raise DataError("synthetic data (empty data.path) has no timestamps for "
                            "data.split = 'time'; set data.path to a ratings file with them, "
                            "or data.split = 'random' / 'per_user'")
        return generate(data_cfg.synthetic)
    from svdfill.data.readers import read_ratings

    lo, hi = float(data_cfg.scale_min), float(data_cfg.scale_max)
    scale: Any = "auto" if math.isnan(lo) and math.isnan(hi) else (lo, hi)
    from svdfill.data.sources import is_uri

    return read_ratings(
        data_cfg.path if is_uri(data_cfg.path) else resolve_data_path(data_cfg.path),
        format=data_cfg.format,
        sep=data_cfg.sep,
        user_col=data_cfg.user_col,
        item_col=data_cfg.item_col,
        rating_col=data_cfg.rating_col,
        scale=scale,
        dedupe=data_cfg.dedupe,
        timestamps=timestamps,
        time_col=getattr(data_cfg, "time_col", "timestamp"),
    )


def load_dataset(data_cfg: Any) -> tuple[Ratings, IdMap]:
    """``cfg.data`` → (all ratings with contiguous ids, the id map). Split with
    :func:`svdfill.data.split.split`."""
    return encode(read_raw(data_cfg))
