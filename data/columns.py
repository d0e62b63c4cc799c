"""Which column of a file is the user, item, rating or time (the usual spellings of each
header name), and time values as Unix seconds (int64): integers as they are, floats floored,
ISO dates/times (UTC unless they give an offset), Parquet timestamp/date columns."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from svdfill.data.errors import DataError


# Header names recognised (case-insensitive) when a column setting keeps its default name:
# MovieLens, Surprise/implicit/Spark examples, Amazon (reviewerID, asin, overall), Goodreads,
# Book-Crossing (User-ID, ISBN, Book-Rating).
_COLUMN_ALIASES = {
    "user": ("user", "userid", "user_id", "users", "uid", "user-id", "customer_id", "customerid",
             "reviewerid", "reviewer_id"),
    "item": ("item", "itemid", "item_id", "movieid", "movie_id", "movie", "items", "iid",
             "product_id", "productid", "product", "book_id", "bookid", "isbn", "asin",
             "track_id", "trackid"),
    "rating": ("rating", "ratings", "score", "stars", "rate", "overall", "book-rating",
               "book_rating"),
    # data.time_col's default; the others only when the setting is left alone
    "timestamp": ("timestamp", "time", "ts", "date", "datetime", "unix_time", "unixtime",
                  "unixreviewtime", "rated_at", "created_at"),
}
def _pick_column(names: Sequence[str], role: str, want: str) -> str | None:
    """The column of ``names`` holding ``role``: ``want`` itself, or — when ``want`` is the
    default name (the setting was left alone) — the first of the usual spellings present
    (userId, movieId, item_id, score, ...; case-insensitive). None when there is none."""
    if want in names:
        return want
    if want != role:  # a name the user chose is taken literally: no guessing behind it
        return None
    lower = {n.lower(): n for n in names}
    return next((lower[a] for a in _COLUMN_ALIASES[role] if a in lower), None)


def _no_time_column(loc: str, names: Sequence[str], time_col: str) -> str:
    alias = (" (nor time, ts, date, ...)" if time_col == "timestamp" else "")
    return (f"{loc}: no timestamp column {time_col!r}{alias} for data.split = 'time'; the file has "
            f"{', '.join(repr(n) for n in names)}; set data.time_col to the column holding each "
            "rating's time, or use data.split = 'random' / 'per_user'")


# ----------------------------------------------------------------------------------------
# Timestamps
# ----------------------------------------------------------------------------------------
def _timestamps(col: pa.ChunkedArray, name: str, locate: Callable, path: str) -> np.ndarray:
    """int64 [n] Unix seconds of a timestamp column: integers as they are, floats floored,
    Arrow timestamps/dates and ISO text (UTC without an offset) converted. A value that is
    none of these raises naming its line (row)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    _no_nulls(pa.chunked_array([col]), "timestamp", name, locate)
    col = _decoded(col)
    t = col.type
    if pa.types.is_integer(t):
        return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return _floored(np.asarray(pc.cast(col, pa.float64()).to_numpy(), dtype=np.float64),
                        locate)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        # the stored value is UTC (or naive, read as UTC); seconds, sub-seconds dropped
        sec = pc.cast(pc.cast(col, pa.timestamp("s", t.tz if pa.types.is_timestamp(t) else None),
                              safe=False), pa.int64())
        return np.asarray(sec.to_numpy(), dtype=np.int64)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{path}: timestamp column {name!r} has type {t}; expected integers "
                        "(Unix seconds), dates or ISO date text; set data.time_col")
    # text: one vectorized cast per reading (all integers, all numbers, all ISO, naive or
    # with an offset); a mixed or bad column falls back to Python, which names the bad line
    for to in (pa.int64(), pa.float64(), pa.timestamp("ns"), pa.timestamp("ns", "UTC")):
        try:
            got = pc.cast(pc.utf8_trim_whitespace(col), to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        if pa.types.is_timestamp(to):
            return np.asarray(pc.cast(got, pa.int64()).to_numpy(), dtype=np.int64) // 10**9
        if to == pa.float64():
            return _floored(np.asarray(got.to_numpy(), dtype=np.float64), locate)
        return np.asarray(got.to_numpy(), dtype=np.int64)
    out = np.empty(len(col), dtype=np.int64)
    for j, v in enumerate(col.to_pylist()):
        sec = _text_seconds(v)
        if sec is None:
            (loc, _, text), = locate([j])
            raise DataError(f"{loc}: timestamp {v!r} is neither Unix seconds nor an ISO date: "
                            f"{text}; set data.time_col to the column holding each rating's time")
        out[j] = sec
    return out


def _floored(a: np.ndarray, locate: Callable) -> np.ndarray:
    bad = ~np.isfinite(a)
    if bad.any():
        (loc, _, text), = locate([int(np.flatnonzero(bad)[0])])
        raise DataError(f"{loc}: timestamp is not a finite number: {text}")
    return np.floor(a).astype(np.int64)


def _text_seconds(text: str) -> int | None:
    """Unix seconds of one timestamp text (integer, number, ISO date/time), else None."""
    import datetime as dt

    s = text.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
        return int(math.floor(f)) if math.isfinite(f) else None
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(math.floor(d.timestamp()))


def _no_nulls(col: pa.ChunkedArray, role: str, name: str, locate) -> None:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        (loc, _, text), = locate([row])
        raise DataError(f"{loc}: missing (null) {role} in column {name!r}: {text}")


def _decoded(col):
    """``col`` with a dictionary encoding undone (Parquet writers often encode id columns)."""
    t = col.type
    return pc.cast(col, t.value_type) if pa.types.is_dictionary(t) else col
