"""Parquet rating files: only the three (or four) columns read, whole or a rank's row groups;
Hive ``key=value`` folders supply columns a part file leaves out; a bad row is named by
looking it up again in the file (the table is not kept alive for error messages)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from svdfill.data.columns import _decoded, _no_nulls, _no_time_column, _pick_column, _timestamps
from svdfill.data.errors import DataError, where
from svdfill.data.sources import Part


def _read_parquet(part: Part, user_col: str, item_col: str, rating_col: str,
                  time_col: str | None = None):
    path = part.display
    try:
        handle = (pa.BufferReader(part.read_all()) if part.compression
                  else part.fs.open_input_file(part.path))
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from None
    with handle:
        table, _ = _parquet_columns(handle, path, part, user_col, item_col, rating_col, time_col)

    def locate(rows: Sequence[int]) -> list[tuple[str, str, str]]:
        # rows are looked up again in the file, on the error path only: the table itself is
        # not kept alive for them (at 100M ratings it is gigabytes)
        out = []
        with (pa.BufferReader(part.read_all()) if part.compression
              else part.fs.open_input_file(part.path)) as h:
            again, first = _parquet_columns(h, path, part, user_col, item_col, rating_col)
            for r in rows:
                vals = {c: again.column(c)[int(r)].as_py() for c in (user_col, item_col, rating_col)}
                n = first + int(r) + 1  # rows are counted in the file, not in a row-group share
                out.append((where(path, n, row=True), f"row {n}",
                            ", ".join(f"{k}={v!r}" for k, v in vals.items())))
        return out

    users = _parquet_ids(table.column(user_col), "user", user_col, locate, path)
    items = _parquet_ids(table.column(item_col), "item", item_col, locate, path)
    rcol = table.column(rating_col)
    _no_nulls(rcol, "rating", rating_col, locate)
    if not (pa.types.is_floating(rcol.type) or pa.types.is_integer(rcol.type)
            or pa.types.is_decimal(rcol.type)):
        try:
            rcol = pc.cast(rcol, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad = _first_bad_number(rcol)
            if bad is None:
                raise DataError(f"{path}: rating column {rating_col!r} has type {rcol.type}, "
                                "expected numbers") from None
            (loc, _, text), = locate([bad])
            raise DataError(f"{loc}: rating is not a number: {text}") from None
    ratings = np.asarray(pc.cast(rcol, pa.float64()).to_numpy(), dtype=np.float64)
    ts = _timestamps(table.column(time_col), time_col, locate, path) if time_col is not None else None
    return users, items, ratings, locate, ts


def _parquet_columns(handle, path: str, part: Part, user_col: str, item_col: str, rating_col: str,
                     time_col: str | None = None):
    """(table of the three columns (four with ``time_col``) of ``part``'s row groups, the file
    row of its first row); only those columns are read."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(handle)
        names = list(f.schema_arrow.names)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    # Hive-style folders (``user_bucket=3/``) supply the columns a part file leaves out
    folders = dict(part.partition)
    actual = {}
    for role, want in (("user", user_col), ("item", item_col), ("rating", rating_col)):
        found = _pick_column(names, role, want)
        if found is None and want not in folders:
            raise DataError(f"{path}: missing {role} column {want!r}; the file has "
                            f"{', '.join(repr(n) for n in names)}; set data.{role}_col (--{role}-col)")
        actual[want] = found
    if time_col is not None:
        found = _pick_column(names, "timestamp", time_col)
        if found is None or found in actual.values():
            raise DataError(_no_time_column(path, names, time_col))
        actual[time_col] = found
    cols = [c for c in actual.values() if c is not None]
    try:
        if part.row_groups is None:
            table, first = f.read(columns=cols), 0
        else:
            lo, hi = part.row_groups
            table = f.read_row_groups(list(range(lo, hi)), columns=cols)
            first = sum(f.metadata.row_group(g).num_rows for g in range(lo))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    # the columns under the names asked for (an alias such as userId read as "user"), the
    # ones a Hive folder supplies appended
    table = pa.table({want: (table.column(got) if got is not None
                             else pa.array([folders[want]] * table.num_rows, pa.string()))
                      for want, got in actual.items()})
    return table, first


def _first_bad_number(col: pa.ChunkedArray) -> int | None:
    for i, v in enumerate(col.to_pylist()):
        try:
            float(v)
        except (TypeError, ValueError):
            return i
    return None


def _parquet_ids(col: pa.ChunkedArray, role: str, name: str, locate, path: str) -> np.ndarray:
    _no_nulls(col, role + " id", name, locate)
    col = _decoded(col)
    t = col.type
    if pa.types.is_integer(t):
        return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
    if pa.types.is_floating(t):
        a = col.to_numpy()
        frac = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if frac.size:
            (loc, _, text), = locate([int(frac[0])])
            raise DataError(f"{loc}: {role} id is not an integer in float column {name!r}: {text}")
        return a.astype(np.int64)
    raise DataError(f"{path}: {role} column {name!r} has type {t}; expected integers or strings")
