"""Rating files → :class:`RawRatings` (raw ids as in the file, float32 ratings).

Formats (``format=``; ``"auto"`` picks one from the file name and first line):

==========  =====================================================================  =========
format      layout                                                                  scale
==========  =====================================================================  =========
ml-100k     ``user<TAB>item<TAB>rating<TAB>timestamp``, no header (u.data, u1.base)  1–5
ml-dat      ``user::item::rating[::timestamp]``, no header (ML-1M/10M ratings.dat)   1–5
csv         a header row naming the columns (``user_col``/``item_col``/              MovieLens
            ``rating_col``; MovieLens ``userId,movieId,rating,timestamp`` is          0.5–5,
            recognised); ``sep`` defaults to ``,``                                    else none
plain       ``user item rating [timestamp]``, no header, separator taken from the    none
            first line (tab, comma, semicolon, pipe or one space; FilmTrust)
parquet     columns ``user_col``/``item_col``/``rating_col``                          none
==========  =====================================================================  =========

The fast path is one multi-threaded ``pyarrow.csv`` read (``::`` and other multi-character
separators are translated to one byte in memory). Only when it fails does a line-by-line
scan run, to name the exact bad line. Every problem raises
:class:`~svdfill.data.errors.DataError` naming file, 1-based line (or Parquet row), the
problem and the offending text.

Timestamps (``timestamps=True``, asked for by ``data.split = "time"`` only, so every other
run reads and holds nothing more): the 4th field of headerless text (ml-100k, ml-dat,
plain), the ``time_col`` column of csv and Parquet (default ``timestamp``; when left at the
default, ``time``/``ts``/``date``/... are recognised too). Integers are Unix seconds; floats
are floored to seconds; ISO dates/times in text and Parquet timestamp/date columns become
Unix seconds (UTC when no offset is given). A file without them is a DataError naming it.

Raw ids keep their type: a text column whose every value is a canonical integer becomes
int64, anything else stays ``str`` (so ``"007"`` is not silently merged with ``"7"``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from svdfill.data.columns import _pick_column
from svdfill.data.errors import DataError
from svdfill.data.parquet_format import _read_parquet
from svdfill.data.sources import Part, resolve
from svdfill.data.text_format import _detect_format, _read_text, _sep_name, _text_layout

FORMATS = ("auto", "ml-100k", "ml-dat", "csv", "plain", "parquet")
DEDUPE = ("error", "last", "mean")
@dataclass
class RawRatings:
    """Ratings as read: raw ids and values, one entry per (user, item) pair.

    users, items: int64 [n] or object [n] of ``str`` (raw ids, file dtype)
    ratings: float32 [n]
    source: where they came from (a path, or ``"synthetic:..."``)
    truth: the planted model for synthetic data (see :mod:`svdfill.data.synth`), else None
    timestamps: int64 [n] Unix seconds when read with ``timestamps=True``, else None
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    source: str = ""
    truth: Any = None
    timestamps: np.ndarray | None = None
    _codes: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    def codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user_uniques, user_codes int64 [n], item_uniques, item_codes int64 [n]), uniques
        sorted; computed once and cached (the reader and :class:`IdMap` share it)."""
        if self._codes is None:
            from svdfill.data.idmap import factorize

            uu, uc = factorize(self.users)
            iu, ic = factorize(self.items)
            self._codes = (uu, uc, iu, ic)
        return self._codes


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------
def read_ratings(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    sep: str = "",
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    scale: tuple[float, float] | None | str = "auto",
    dedupe: str = "error",
    timestamps: bool = False,
    time_col: str = "timestamp",
) -> RawRatings:
    """Read a ratings file.

    format: one of :data:`FORMATS`. sep: field separator of text formats ("" = the
    format's own). user_col/item_col/rating_col: column names for csv-with-header and
    Parquet. scale: ``(lo, hi)`` (either side may be NaN = unchecked), ``None`` (no check)
    or ``"auto"`` (the format's own: MovieLens 1–5, MovieLens ratings.csv 0.5–5, else none).
    dedupe: duplicate (user, item) pairs → ``"error"`` (names both lines), ``"last"`` (keep
    the last) or ``"mean"`` (average them, kept at the first occurrence's position, with
    the latest of their timestamps). timestamps: also read each rating's time into
    ``RawRatings.timestamps`` (int64 [n] Unix seconds); a file without one is a DataError.
    time_col: the timestamp column of csv and Parquet (headerless text: the 4th field).
    """
    shown = str(path)
    if format not in FORMATS:
        raise DataError(f"{shown}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if dedupe not in DEDUPE:
        raise DataError(f"{shown}: unknown dedupe policy {dedupe!r}; expected one of {', '.join(DEDUPE)}")
    parts = resolve(path)
    source = parts[0].display if len(parts) == 1 else _redacted(shown)
    raw, locate = read_parts(parts, source=source, format=format, sep=sep, user_col=user_col,
                             item_col=item_col, rating_col=rating_col, scale=scale,
                             timestamps=timestamps, time_col=time_col)
    if len(raw) == 0:
        raise DataError(f"{source}: no ratings (the file holds no data rows)")
    return _dedupe(source, raw, dedupe, locate)


def read_parts(parts: Sequence[Part], *, source: str, format: str = "auto", sep: str = "",
               user_col: str = "user", item_col: str = "item", rating_col: str = "rating",
               scale: tuple[float, float] | None | str = "auto", timestamps: bool = False,
               time_col: str = "timestamp") -> tuple[RawRatings, Callable]:
    """The ratings of ``parts`` in order, values checked, duplicates not looked at (a
    rank reading its share of a dataset leaves that to the rank that gathers each item's
    ratings). Returns ``(raw, locate)``: ``locate(rows) -> [(where, label, text)]`` names
    the part file and line/row of rows of ``raw``. No parts: an empty ``raw``.
    timestamps/time_col: as :func:`read_ratings`.
    """
    if len(parts) > 1:
        # a dataset may hold empty part files (Spark writes them for empty partitions)
        parts = [p for p in parts if p.size > 0] or list(parts[:1])
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return RawRatings(empty, empty.copy(), np.zeros(0, np.float32), source=source,
                          timestamps=empty.copy() if timestamps else None), lambda rows: []
    tcol = time_col if timestamps else None
    read = [_read_part(p, format, sep, user_col, item_col, rating_col, tcol) for p in parts]
    formats = {r[0] for r in read}
    if len(formats) > 1:
        a = next(r for r in read if r[0] == read[0][0])
        b = next(r for r in read if r[0] != read[0][0])
        raise DataError(f"{source}: mixes formats: {a[1]} is {a[0]} but {b[1]} is {b[0]}; "
                        "point data.path at one kind of file")
    fmt_scale = read[0][3]
    ts = np.concatenate([r[4] for r in read]) if timestamps else None
    cols = [r[2] for r in read]
    del read  # _concat releases each part's arrays as it joins them
    users, items, ratings, locate = _concat(cols)
    if isinstance(scale, str):
        if scale != "auto":
            raise DataError(f"{source}: scale must be (lo, hi), None or 'auto', got {scale!r}")
        scale = fmt_scale
    _check_values(source, ratings, scale, locate)
    return RawRatings(users, items, ratings.astype(np.float32), source=source, timestamps=ts), locate


@dataclass
class Detected:
    """How :func:`read_ratings` will read a path (from its first part file's name and head,
    nothing more): what ``svdfill train`` prints before reading everything."""

    source: str
    """The path as messages name it (the part file, or the dataset with its part count)."""
    format: str
    """ml-100k | ml-dat | csv | plain | parquet."""
    sep: str
    """Field separator of text ("" for Parquet)."""
    header: bool
    """The first non-blank line names the columns."""
    columns: tuple[str, str, str]
    """The user, item and rating columns as named in the file (positions for headerless text)."""
    crlf: bool
    """Text lines end in CR LF (Windows); read the same as LF."""
    scale: tuple[float, float] | None
    """The format's own rating scale (MovieLens), else None."""

    def describe(self) -> str:
        """One line: format, separator, header, line ends, columns."""
        if self.format == "parquet":
            how = "Parquet"
        else:
            how = f"{self.format} text, {_sep_name(self.sep)}-separated, " + (
                "header row" if self.header else "no header") + (", CRLF line ends" if self.crlf else "")
        cols = (f"user={self.columns[0]!r}, item={self.columns[1]!r}, rating={self.columns[2]!r}"
                if self.header or self.format == "parquet" else "user, item, rating = fields 1, 2, 3")
        return f"{self.source}: {how}; {cols}"


def detect_layout(path: str | os.PathLike, *, format: str = "auto", sep: str = "",
                  user_col: str = "user", item_col: str = "item",
                  rating_col: str = "rating") -> Detected:
    """What :func:`read_ratings` with these settings will find in ``path``: its first part
    file's format, separator, header and columns, read from the head only (cheap on any
    size). Raises :class:`DataError` as the reader would (a wrong separator, a missing column)."""
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    parts = [p for p in resolve(path) if p.size > 0] or resolve(path)[:1]
    part = parts[0]
    source = part.display if len(parts) == 1 else f"{_redacted(str(path))} ({len(parts)} part files)"
    format, sep, head = _part_format(part, format, sep)
    if format == "parquet":
        import pyarrow.parquet as pq

        with pa.BufferReader(part.read_all()) if part.compression else part.fs.open_input_file(part.path) as h:
            try:
                names = list(pq.ParquetFile(h).schema_arrow.names)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{part.display}: not a readable Parquet file: {e}") from None
        cols = tuple(_pick_column(names, role, want) or want for role, want in
                     (("user", user_col), ("item", item_col), ("rating", rating_col)))
        return Detected(source, "parquet", "", True, cols, False, None)  # type: ignore[arg-type]
    layout = _text_layout(part.display, head, format, sep, user_col, item_col, rating_col)
    first_end = head.find(b"\n")
    crlf = first_end > 0 and head[first_end - 1:first_end] == b"\r"
    return Detected(source, layout.format, layout.sep, layout.header, layout.usecols, crlf, layout.scale)


def _redacted(text: str) -> str:
    return text.split("?", 1)[0]


def _part_format(part: Part, format: str, sep: str) -> tuple[str, str, bytes]:
    """(format, separator, the file's first 64 KiB): ``"auto"`` resolved from the name and
    the head; an empty file is an error."""
    if part.size == 0:
        raise DataError(f"{part.display}: empty file (no ratings)")
    head = part.read_head()
    if format == "auto":
        format, sniffed = _detect_format(part, head)
        sep = sep or sniffed
    return format, sep, head


def _read_part(part: Part, format: str, sep: str, user_col: str, item_col: str, rating_col: str,
               time_col: str | None = None):
    """(format, display, (users, items, ratings float64, locate), the format's scale,
    timestamps int64 [n] or None) of one part file; ``time_col`` None: no timestamps read."""
    format, sep, head = _part_format(part, format, sep)
    if format == "parquet":
        *cols, ts = _read_parquet(part, user_col, item_col, rating_col, time_col)
        return format, part.display, tuple(cols), None, ts
    layout = _text_layout(part.display, head, format, sep, user_col, item_col, rating_col, time_col)
    *cols, ts = _read_text(part, layout)
    return format, part.display, tuple(cols), layout.scale, ts


def _concat(cols: list[tuple]) -> tuple:
    """One (users, items, ratings, locate) from the parts' in file order; ``locate`` maps a
    row of the whole to its part's file and line."""
    if len(cols) == 1:
        return cols[0]

    def ids(arrays: list[np.ndarray]) -> np.ndarray:
        if all(a.dtype == np.int64 for a in arrays):
            return np.concatenate(arrays)
        # one part with text ids makes every id text: 7 in one part is "7" in another
        return np.concatenate([a if a.dtype == object else a.astype(str).astype(object)
                               for a in arrays])

    starts = np.cumsum([0] + [len(c[2]) for c in cols])
    locates = [c[3] for c in cols]
    # each column joined, then its parts dropped: the peak is one column's copy, not three
    parts = [list(c[:3]) for c in cols]
    cols.clear()
    joined = []
    for j, join in enumerate((ids, ids, np.concatenate)):
        joined.append(join([p[j] for p in parts]))
        for p in parts:
            p[j] = None
    users, items, ratings = joined

    def locate(rows: Sequence[int]) -> list[tuple[str, str, str]]:
        out = []
        for r in rows:
            j = int(np.searchsorted(starts, int(r), side="right")) - 1
            out.extend(locates[j]([int(r) - int(starts[j])]))
        return out

    return users, items, ratings, locate


# ----------------------------------------------------------------------------------------
# Checks shared by every format
# ----------------------------------------------------------------------------------------
def _check_values(path: str, ratings: np.ndarray, scale, locate: Callable) -> None:
    bad = ~np.isfinite(ratings)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        (loc, _, text), = locate([row])
        raise DataError(f"{loc}: rating is {ratings[row]} (must be a finite number): {text}")
    if scale is None:
        return
    lo, hi = (float(scale[0]), float(scale[1]))
    out = np.zeros(ratings.shape, dtype=bool)
    if not math.isnan(lo):
        out |= ratings < lo
    if not math.isnan(hi):
        out |= ratings > hi
    if out.any():
        row = int(np.flatnonzero(out)[0])
        (loc, _, text), = locate([row])
        n = int(out.sum())
        raise DataError(f"{loc}: rating {ratings[row]:g} is outside the scale [{lo:g}, {hi:g}]: {text}"
                        f" ({n} such rating{'s' if n > 1 else ''}; set data.scale_min/scale_max (--scale MIN:MAX))")


_TABLE_CELLS = 1 << 26  # bool cells of the duplicate-check table (64 MiB)


def count_distinct_pairs(uc: np.ndarray, ic: np.ndarray, n_users: int, n_items: int) -> int:
    """Number of distinct (user, item) pairs among contiguous ids (int64 [n] each).

    A bool table over the user×item grid, a block of users at a time (bounded memory):
    O(n + cells), no sort, so checking 100M ratings for duplicates stays cheap.
    """
    n = uc.size
    if n == 0:
        return 0
    n_items = max(int(n_items), 1)
    rows = max(1, _TABLE_CELLS // n_items)
    if n_users <= rows:
        table = np.zeros(n_users * n_items, dtype=bool)
        table[uc * n_items + ic] = True
        return int(np.count_nonzero(table))
    block = uc // rows
    n_blocks = int(block.max()) + 1
    order = np.argsort(block.astype(np.uint16) if n_blocks < 65536 else block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
    table = np.zeros(rows * n_items, dtype=bool)
    total = 0
    for b in range(n_blocks):
        sel = order[bounds[b]:bounds[b + 1]]
        if sel.size == 0:
            continue
        cells = (uc[sel] - b * rows) * n_items + ic[sel]
        table[cells] = True
        used = (min(rows, n_users - b * rows)) * n_items  # only this block's rows can be set
        total += int(np.count_nonzero(table[:used]))
        table[cells] = False
    return total


def resolve_duplicates(key: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray | None,
                       policy: str, *, order: np.ndarray | None = None):
    """``data.dedupe = "last" | "mean"`` on rows in file order: ``key`` int64 [n] (one value
    per (user, item) pair), ``ratings`` float32 [n], ``timestamps`` int64 [n] or None.

    Returns ``(keep, ratings, timestamps)``: ``keep`` int64 [m], the surviving rows' indices
    in ascending order (last: each pair's last row; mean: its first row, which carries the
    float64 mean of the pair's ratings and its latest time). ``order``: a stable argsort of
    ``key`` when the caller has one. A pure function of the rows, so a rank holding every
    row of some users gets exactly the rows one process keeps for them."""
    if order is None:
        order = np.argsort(key, kind="stable")
    skey = key[order]
    start = np.ones(skey.size, dtype=bool)
    start[1:] = skey[1:] != skey[:-1]
    group = np.cumsum(start) - 1  # group id of each sorted row
    n_groups = int(group[-1]) + 1 if group.size else 0
    if policy == "last":
        end = np.ones(skey.size, dtype=bool)
        end[:-1] = start[1:]
        keep = np.sort(order[end])
        return keep, ratings[keep], (timestamps[keep] if timestamps is not None else None)
    if policy != "mean":
        raise ValueError(f"dedupe policy {policy!r}: expected 'last' or 'mean'")
    # mean, in float64, kept at the first occurrence's position
    sums = np.bincount(group, weights=ratings[order].astype(np.float64), minlength=n_groups)
    counts = np.bincount(group, minlength=n_groups)
    firsts = order[start]
    pos = np.argsort(firsts, kind="stable")
    keep = firsts[pos]
    ts = None
    if timestamps is not None:  # the pair's latest time: when its mean was complete
        latest = np.full(n_groups, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(latest, group, timestamps[order])
        ts = latest[pos]
    return keep, (sums / counts)[pos].astype(np.float32), ts


def _dedupe(path: str, raw: RawRatings, policy: str, locate: Callable) -> RawRatings:
    uu, uc, iu, ic = raw.codes()
    if count_distinct_pairs(uc, ic, len(uu), len(iu)) == len(raw):
        return raw
    # slow path, only with duplicates: sort the pair keys
    key = uc * max(len(iu), 1) + ic
    order = np.argsort(key, kind="stable")
    skey = key[order]
    dup = skey[1:] == skey[:-1]  # dup[j]: sorted row j+1 repeats the pair of sorted row j
    n_dup = int(dup.sum())
    if policy == "error":
        later = order[1:][dup]  # rows that repeat an earlier row's pair
        j = int(later.min())
        first = int(order[np.searchsorted(skey, key[j])])
        (loc_j, _, text_j), (_, label_i, text_i) = locate([j, first])
        u, i = raw.users[j], raw.items[j]
        raise DataError(
            f"{loc_j}: duplicate (user, item) pair ({_plain(u)}, {_plain(i)}): {text_j} repeats "
            f"{label_i} {text_i} ({n_dup} duplicate row{'s' if n_dup > 1 else ''} in all); "
            "set data.dedupe (--dedupe) to 'last' or 'mean' to accept them")
    keep, ratings, ts = resolve_duplicates(key, raw.ratings, raw.timestamps, policy, order=order)
    out = RawRatings(raw.users[keep], raw.items[keep], ratings, raw.source, timestamps=ts)
    out._codes = (uu, uc[keep], iu, ic[keep])
    return out


def _plain(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(int(v))
