"""Raw ids (ints or strings, as in the file) ↔ contiguous ids ``0..n-1``.

The contiguous id of a raw id is its position among the *sorted* distinct raw ids, so the
map depends only on the set of ids, never on file order or hashing: the same file always
gives the same model rows. The map travels with the model (``to_state``) so every output
speaks raw ids again, with their original dtype (int64 or str).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def _is_int_array(a: np.ndarray) -> bool:
    return a.dtype.kind in "iu"


def as_id_array(values: Any) -> np.ndarray:
    """Raw ids as int64 (any integer input) or an object array of ``str`` (anything else).

    Accepts numpy arrays, lists, torch tensors and pyarrow arrays."""
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_integer(values.type):
            return np.asarray(values.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.asarray(values.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    a = np.asarray(values)
    if _is_int_array(a):
        return a.astype(np.int64, copy=False)
    if a.dtype == object and a.size and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in a.flat):
        return a.astype(np.int64)
    if a.size == 0 and a.dtype.kind == "f":
        return np.zeros(0, dtype=np.int64)
    return np.asarray([str(v) for v in a.ravel()], dtype=object)


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and the code of each value: ``uniques[codes] == values``.

    values: int64 [n] or object (str) [n]. Returns (uniques [k] same dtype, codes int64 [n]).
    Integers go through a presence table over their range when it is dense enough (no sort;
    the codes are the offsets themselves when every id in the range occurs), else a stable
    argsort; strings through a pyarrow hash table, then only the k distinct strings are
    sorted.
    """
    values = as_id_array(values)
    if values.dtype == np.int64:
        return _factorize_int(values)
    enc = pc.dictionary_encode(pa.array(values, type=pa.string()))
    dictionary = np.asarray(enc.dictionary.to_numpy(zero_copy_only=False), dtype=object)
    order = np.argsort(dictionary.astype(str), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    codes = rank[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
    return dictionary[order], codes


def _factorize_int(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    span = hi - lo + 1
    if span <= 4 * n + (1 << 22):
        # ids are dense enough for a presence table: O(n + span), no sort
        offset = values - lo
        present = np.zeros(span, dtype=bool)
        present[offset] = True
        if present.all():  # ids lo..hi all used (e.g. 0..n-1 or 1..n): the offset is the code
            return np.arange(lo, hi + 1, dtype=np.int64), offset
        uniques = np.flatnonzero(present) + lo
        rank = np.cumsum(present, dtype=np.int64) - 1
        return uniques.astype(np.int64), rank[offset]
    order = np.argsort(values, kind="stable")
    s = values[order]
    start = np.ones(n, dtype=bool)
    start[1:] = s[1:] != s[:-1]
    codes = np.empty(n, dtype=np.int64)
    codes[order] = np.cumsum(start) - 1
    return s[start], codes


def _lookup(table: np.ndarray, raw: Any) -> np.ndarray:
    """Position of each raw id in the sorted id ``table``; -1 where absent."""
    query = np.asarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw)
    scalar = query.ndim == 0
    query = query.reshape(-1)
    if query.size == 0:
        return np.zeros(0, dtype=np.int64)
    if table.dtype == np.int64:
        if _is_int_array(query):
            q = query.astype(np.int64, copy=False)
        else:
            # ids given as text ("12") match the integer id 12; anything else is unknown
            strs = np.asarray([str(v) for v in query], dtype=object)
            qv = np.zeros(query.size, dtype=np.int64)
            ok = np.zeros(query.size, dtype=bool)
            for j, v in enumerate(strs):
                try:
                    qv[j] = int(v)
                except (ValueError, OverflowError):
                    continue
                ok[j] = str(qv[j]) == v
            out = np.full(query.size, -1, dtype=np.int64)
            if ok.any():
                out[ok] = _lookup(table, qv[ok])
            return out[0:1].reshape(()) if scalar else out
        if table.size == 0:
            return np.full(q.size, -1, dtype=np.int64)
        pos = np.searchsorted(table, q)
        pos_c = np.minimum(pos, table.size - 1)
        found = table[pos_c] == q
        out = np.where(found, pos_c, -1).astype(np.int64)
    else:
        strs = query.astype(str)
        idx = pc.index_in(pa.array(strs, type=pa.string()), value_set=pa.array(table, type=pa.string()))
        out = np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return out[0:1].reshape(()) if scalar else out


class IdMap:
    """Contiguous ids for users and items.

    ``user_ids[u]`` is the raw id of contiguous user ``u`` (sorted ascending, distinct);
    the same for items. Raw ids are int64 or ``str`` (object arrays), per axis.
    """

    def __init__(self, user_ids: np.ndarray, item_ids: np.ndarray):
        self.user_ids = as_id_array(user_ids)
        self.item_ids = as_id_array(item_ids)
        for name, ids in (("user", self.user_ids), ("item", self.item_ids)):
            if ids.size > 1:
                keys = ids if ids.dtype == np.int64 else ids.astype(str)
                if not bool(np.all(keys[1:] > keys[:-1])):
                    raise ValueError(f"IdMap: {name} ids must be sorted and distinct")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, raw: Any) -> "IdMap":
        """The map of every user and item of a :class:`~svdfill.data.readers.RawRatings`."""
        return cls.build_encoded(raw)[0]

    @classmethod
    def build_encoded(cls, raw: Any) -> tuple["IdMap", np.ndarray, np.ndarray]:
        """The map plus the contiguous ids (int64 [n]) of ``raw.users`` and ``raw.items``,
        from one factorization (cheaper than ``build`` followed by ``encode_*``)."""
        codes = raw.codes() if hasattr(raw, "codes") else None
        if codes is None:
            uu, uc = factorize(raw.users)
            iu, ic = factorize(raw.items)
        else:
            uu, uc, iu, ic = codes
        return cls(uu, iu), uc, ic

    # -- sizes --------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @property
    def n_items(self) -> int:
        return int(self.item_ids.size)

    @property
    def user_dtype(self) -> str:
        """``"int64"`` or ``"str"``."""
        return "int64" if self.user_ids.dtype == np.int64 else "str"

    @property
    def item_dtype(self) -> str:
        return "int64" if self.item_ids.dtype == np.int64 else "str"

    # -- encode / decode ----------------------------------------------------------------
    def encode_users(self, raw: Any) -> np.ndarray:
        """Contiguous ids (int64, same shape) of raw user ids; -1 for ids not in the map."""
        return _lookup(self.user_ids, raw)

    def encode_items(self, raw: Any) -> np.ndarray:
        """Contiguous ids (int64) of raw item ids; -1 for ids not in the map."""
        return _lookup(self.item_ids, raw)

    def decode_users(self, idx: Any) -> np.ndarray:
        """Raw user ids (int64 or object str array) of contiguous ids (int array or tensor)."""
        return self.user_ids[_index(idx, self.n_users, "user")]

    def decode_items(self, idx: Any) -> np.ndarray:
        """Raw item ids of contiguous ids."""
        return self.item_ids[_index(idx, self.n_items, "item")]

    # -- persistence ----------------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain state for ``torch.save``; loads with ``torch.load(weights_only=True)``:
        int ids as int64 tensors, string ids as lists of ``str``."""
        return {
            "format": "svdfill-idmap/1",
            "users": _id_state(self.user_ids),
            "items": _id_state(self.item_ids),
        }

    @classmethod
    def from_state(cls, state: dict) -> "IdMap":
        if not isinstance(state, dict) or "users" not in state or "items" not in state:
            raise ValueError("not an IdMap state (expected keys 'users' and 'items')")
        return cls(_id_from_state(state["users"]), _id_from_state(state["items"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdMap):
            return NotImplemented
        return (
            self.user_ids.dtype == other.user_ids.dtype
            and self.item_ids.dtype == other.item_ids.dtype
            and np.array_equal(self.user_ids, other.user_ids)
            and np.array_equal(self.item_ids, other.item_ids)
        )

    def __repr__(self) -> str:
        return (f"IdMap(n_users={self.n_users} [{self.user_dtype}], "
                f"n_items={self.n_items} [{self.item_dtype}])")


def _index(idx: Any, n: int, what: str) -> np.ndarray:
    a = np.asarray(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx)
    if not _is_int_array(a):
        raise TypeError(f"contiguous {what} ids must be integers, got {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise IndexError(f"contiguous {what} id out of range [0, {n})")
    return a


def _id_state(ids: np.ndarray) -> Any:
    if ids.dtype == np.int64:
        return torch.from_numpy(ids.copy())
    return [str(v) for v in ids]


def _id_from_state(s: Any) -> np.ndarray:
    if isinstance(s, torch.Tensor):
        return s.cpu().numpy().astype(np.int64)
    return np.asarray(list(s), dtype=object) if len(s) else np.zeros(0, dtype=object)
