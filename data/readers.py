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

import csv
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from svdfill.data.errors import DataError, show, where
from svdfill.data.sources import Part, resolve

FORMATS = ("auto", "ml-100k", "ml-dat", "csv", "plain", "parquet")
DEDUPE = ("error", "last", "mean")
MOVIELENS_SCALE = (1.0, 5.0)
MOVIELENS_CSV_SCALE = (0.5, 5.0)

# Candidate separators, in the order auto-detection prefers them.
_SEPARATORS = ("::", "\t", ",", ";", "|", " ")
_SEP_NAMES = {"\t": "tab", " ": "space", ",": "comma", ";": "semicolon", "|": "pipe", "::": "'::'"}
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
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_ML100K_NAME = re.compile(r"^u(\d|[ab])?\.(data|base|test)$")
_TRANSLATED_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character separators


def _sep_name(sep: str) -> str:
    return _SEP_NAMES.get(sep, repr(sep))


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
# Format detection
# ----------------------------------------------------------------------------------------
def _first_line(head: bytes) -> tuple[int, str]:
    """(1-based line number, text) of the first non-blank line of the file's head."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            return n, line
    return 0, ""


def _detect_format(part: Part, head: bytes) -> tuple[str, str]:
    """(format, separator) from the file name (less a compression suffix) and first line
    ("" = the format's own)."""
    name = part.name.lower()
    if name.endswith(_PARQUET_SUFFIXES) or head.startswith(b"PAR1"):
        return "parquet", ""
    if _ML100K_NAME.match(name):
        return "ml-100k", ""
    _, line = _first_line(head)
    if "::" in line:
        return "ml-dat", ""
    sep = _sniff_sep(line)
    fields = line.split(sep) if sep else [line]
    if len(fields) >= 3 and _is_number(fields[2]):
        return "plain", sep
    return "csv", sep


def _sniff_sep(line: str) -> str:
    """The separator that splits ``line`` into the most (≥ 3 preferred) fields."""
    best, best_n = "", 1
    for sep in _SEPARATORS:
        n = len(line.split(sep))
        if n >= 3:
            return sep
        if n > best_n:
            best, best_n = sep, n
    return best


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------
# Text files
# ----------------------------------------------------------------------------------------
@dataclass
class _Layout:
    format: str
    sep: str
    header: bool  # first non-blank line names the columns
    names: list[str]  # all column names, in file order
    usecols: tuple[str, str, str]  # user, item, rating column names
    nfields: int
    scale: tuple[float, float] | None
    header_line: int = 0  # 1-based line of the header (0 = none)
    timecol: str | None = None  # the timestamp column, when asked for


def _text_layout(path: str, head: bytes, format: str, sep: str, user_col: str, item_col: str,
                 rating_col: str, time_col: str | None = None) -> _Layout:
    lineno, line = _first_line(head)
    if not line:
        raise DataError(f"{path}: empty file (only blank lines)")
    if format == "ml-100k":
        sep = sep or "\t"
    elif format == "ml-dat":
        sep = sep or "::"
    elif format == "csv":
        sep = sep or ","
    elif format == "plain":
        sep = sep or _sniff_sep(line)
    if not sep:
        raise DataError(f"{where(path, lineno)}: cannot tell the field separator of {show(line)}; "
                        "set data.sep (--sep)")
    fields = _split(line, sep, quoted=format == "csv")
    if len(fields) == 1:
        _raise_separator(path, lineno, line, sep, format)
    if format == "csv":
        return _csv_layout(path, lineno, line, fields, sep, user_col, item_col, rating_col, time_col)
    if len(fields) not in (3, 4):
        raise DataError(f"{where(path, lineno)}: expected 3 or 4 fields (user, item, rating"
                        f"[, timestamp]) separated by {_sep_name(sep)}, got {len(fields)}: {show(line)}"
                        + _wrong_sep_hint(line, sep))
    if not _is_number(fields[2]):
        hint = ("; it looks like a header row: use format 'csv' (--format csv)" if format != "csv" else "")
        raise DataError(f"{where(path, lineno)}: rating {fields[2]!r} is not a number: {show(line)}{hint}")
    names = ["user", "item", "rating", "timestamp"][: len(fields)]
    scale = MOVIELENS_SCALE if format in ("ml-100k", "ml-dat") else None
    if time_col is not None and len(fields) < 4:
        raise DataError(
            f"{where(path, lineno)}: no timestamp field: {format} lines here have 3 fields (user, item, "
            f"rating) and data.split = 'time' needs a 4th (Unix seconds or an ISO date): {show(line)}; "
            "use a file with timestamps (a csv/Parquet column named by data.time_col), or "
            "data.split = 'random' / 'per_user'")
    return _Layout(format, sep, False, names, ("user", "item", "rating"), len(fields), scale,
                   timecol="timestamp" if time_col is not None else None)


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


def _csv_layout(path: str, lineno: int, line: str, fields: list[str], sep: str, user_col: str,
                item_col: str, rating_col: str, time_col: str | None = None) -> _Layout:
    names = [f.strip() for f in fields]
    if len(set(names)) != len(names):
        raise DataError(f"{where(path, lineno)}: header names a column twice: {show(line)}")
    chosen = []
    for role, want in (("user", user_col), ("item", item_col), ("rating", rating_col)):
        found = _pick_column(names, role, want)
        if found is None:
            data_like = all(_is_number(f) for f in names)
            hint = (" (the first line looks like data: csv needs a header row naming the columns;"
                    " use format 'plain' (--format plain) for files without one)") if data_like else ""
            raise DataError(
                f"{where(path, lineno)}: missing {role} column {want!r}; the header has "
                f"{', '.join(repr(n) for n in names)}{hint}; set data.{role}_col (--{role}-col)")
        chosen.append(found)
    timecol = None
    if time_col is not None:
        timecol = _pick_column(names, "timestamp", time_col)
        if timecol is None or timecol in chosen:
            raise DataError(_no_time_column(where(path, lineno), names, time_col))
    lower = {n.lower() for n in names}
    movielens = {"userid", "movieid"} <= lower
    scale = MOVIELENS_CSV_SCALE if movielens else None
    return _Layout("csv", sep, True, names, tuple(chosen), len(names), scale, header_line=lineno,
                   timecol=timecol)


def _no_time_column(loc: str, names: Sequence[str], time_col: str) -> str:
    alias = (" (nor time, ts, date, ...)" if time_col == "timestamp" else "")
    return (f"{loc}: no timestamp column {time_col!r}{alias} for data.split = 'time'; the file has "
            f"{', '.join(repr(n) for n in names)}; set data.time_col to the column holding each "
            "rating's time, or use data.split = 'random' / 'per_user'")


def _split(line: str, sep: str, quoted: bool) -> list[str]:
    line = line.rstrip("\r\n")
    if quoted and len(sep) == 1:
        return next(csv.reader([line], delimiter=sep, quotechar='"'))
    return line.split(sep)


def _wrong_sep_hint(line: str, sep: str) -> str:
    others = [s for s in _SEPARATORS if s != sep and s in line and not (s == " " and sep == "::")]
    if others:
        return (f"; the separator looks wrong: the line contains {_sep_name(others[0])} — "
                f"set data.sep (--sep) or data.format (--format)")
    return ""


def _raise_separator(path: str, lineno: int, line: str, sep: str, format: str) -> None:
    others = [s for s in _SEPARATORS if s != sep and s in line]
    if others:
        raise DataError(
            f"{where(path, lineno)}: the separator looks wrong: format {format!r} expects fields "
            f"separated by {_sep_name(sep)}, but line {lineno} has none and contains "
            f"{_sep_name(others[0])}: {show(line)}; set data.sep (--sep) or data.format (--format)")
    raise DataError(f"{where(path, lineno)}: expected fields separated by {_sep_name(sep)}, "
                    f"found one field: {show(line)}")


def _read_text(part: Part, layout: _Layout):
    path = part.display
    sep = layout.sep
    if len(sep) > 1:
        data = part.read_all()
        if _TRANSLATED_SEP.encode() in data:
            raise DataError(f"{path}: holds the control character \\x1f; cannot translate "
                            f"separator {sep!r}")
        source: Any = pa.BufferReader(data.replace(sep.encode(), _TRANSLATED_SEP.encode()))
        delim = _TRANSLATED_SEP
    elif part.compression is None and part.fs.type_name == "local":
        source, delim = part.path, sep  # memory-mapped, multi-threaded
    else:
        source, delim = part.open(), sep  # decompressed / remote: streamed
    ucol, icol, rcol = layout.usecols
    read_opts = pacsv.ReadOptions(
        column_names=None if layout.header else layout.names,
        skip_rows=layout.header_line - 1 if layout.header else 0,
        block_size=1 << 24,
    )
    parse_opts = pacsv.ParseOptions(
        delimiter=delim,
        quote_char='"' if layout.format == "csv" else False,
        ignore_empty_lines=True,
    )
    tcol = layout.timecol
    types = {ucol: pa.string(), icol: pa.string(), rcol: pa.float64()}
    if tcol is not None:
        types[tcol] = pa.string()  # integers or ISO dates: _timestamps decides, naming a bad line
    convert_opts = pacsv.ConvertOptions(
        column_types=types,
        include_columns=list(types),
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        table = pacsv.read_csv(source, read_options=read_opts, parse_options=parse_opts,
                               convert_options=convert_opts)
    except (pa.ArrowInvalid, pa.ArrowKeyError, UnicodeDecodeError) as e:
        _scan_text(part, layout)  # raises with the exact line when it finds one
        raise DataError(f"{path}: cannot parse as {layout.format} ({_sep_name(sep)}-separated): {e}") from None

    def locate(rows: Sequence[int]) -> list[tuple[str, str, str]]:
        found = _line_of_rows(part, layout, rows)
        return [(where(path, n), f"line {n}", show(t)) for n, t in found]

    users = _text_ids(table.column(ucol), "user", locate, path)
    items = _text_ids(table.column(icol), "item", locate, path)
    ratings = table.column(rcol).to_numpy()
    ts = _timestamps(table.column(tcol), tcol, locate, path) if tcol is not None else None
    return users, items, ratings, locate, ts


def _text_ids(col: pa.ChunkedArray, role: str, locate, path: str) -> np.ndarray:
    """int64 when every id is a canonical integer, else an object array of str."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    try:
        as_int = pc.cast(col, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        as_int = None
    if as_int is not None:
        # canonical iff the text is exactly as long as the integer's decimal form (no
        # leading zeros, '+' or spaces): "007" stays a string instead of merging with "7"
        length = np.asarray(pc.binary_length(col).to_numpy(), dtype=np.int64)
        if np.array_equal(length, _decimal_length(as_int)):
            return as_int
    stripped = pc.utf8_trim_whitespace(col)
    empty = pc.equal(pc.utf8_length(stripped), 0)
    if pc.any(empty).as_py():
        row = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
        (loc, _, text), = locate([row])
        raise DataError(f"{loc}: empty {role} id: {text}")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def _decimal_length(x: np.ndarray) -> np.ndarray:
    """Characters of ``str(v)`` for each int64 ``v`` (sign included), vectorized."""
    a = np.abs(x.astype(np.float64))
    n = np.ones(x.shape, dtype=np.int64)
    p = 10.0
    while True:
        more = a >= p
        if not more.any():
            break
        n += more
        p *= 10.0
    # float64 rounding near 10^k for |x| > 2^53: fix with exact integer comparison
    big = np.abs(x) > (1 << 53)
    if big.any():
        n[big] = [len(str(abs(int(v)))) for v in x[big]]
    return n + (x < 0)


def _iter_lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its end) for every line of the file, read in
    4 MiB chunks of the decompressed stream (pyarrow streams have no readline)."""
    n, rest = 0, b""
    with part.open() as f:
        while True:
            chunk = f.read(1 << 22)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop() if chunk else b""
            for raw in lines:
                n += 1
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                yield n, raw.rstrip(b"\r")
            if not chunk:
                return


def _data_lines(part: Part, layout: _Layout) -> Iterator[tuple[int, int, bytes]]:
    """(row index, line number, text) of each data row, skipping blank lines and the
    header, numbered exactly as the fast reader numbers its rows."""
    row = 0
    for n, raw in _iter_lines(part):
        if not raw:
            continue
        if layout.header and n <= layout.header_line:
            continue
        yield row, n, raw
        row += 1


def _line_of_rows(part: Part, layout: _Layout, rows: Sequence[int]) -> list[tuple[int, str]]:
    wanted = sorted(set(int(r) for r in rows))
    found: dict[int, tuple[int, str]] = {}
    it = iter(wanted)
    nxt = next(it, None)
    if nxt is not None:
        for row, n, raw in _data_lines(part, layout):
            if row == nxt:
                found[row] = (n, raw.decode("utf-8", errors="replace"))
                nxt = next(it, None)
                if nxt is None:
                    break
    return [found.get(int(r), (0, "")) for r in rows]


def _scan_text(part: Part, layout: _Layout) -> None:
    """Slow path: check every line in Python and raise on the first bad one."""
    path = part.display
    sep = layout.sep
    ucol, icol, rcol = layout.usecols
    idx = [layout.names.index(c) for c in (ucol, icol, rcol)]
    quoted = layout.format == "csv"
    for _, n, raw in _data_lines(part, layout):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where(path, n)}: not valid UTF-8 ({e.reason} at byte {e.start}): "
                            f"{show(raw)}") from None
        fields = _split(line, sep, quoted)
        if len(fields) != layout.nfields:
            what = (f"{layout.nfields} fields" if layout.header else
                    f"{layout.nfields} fields (user, item, rating" + (", timestamp)" if layout.nfields == 4 else ")"))
            hint = _wrong_sep_hint(line, sep) if len(fields) == 1 else ""
            raise DataError(f"{where(path, n)}: expected {what} separated by {_sep_name(sep)}, "
                            f"got {len(fields)}: {show(line)}{hint}")
        for role, j in zip(("user", "item"), idx[:2]):
            if not fields[j].strip():
                raise DataError(f"{where(path, n)}: empty {role} id: {show(line)}")
        value = fields[idx[2]]
        if not _is_number(value):
            raise DataError(f"{where(path, n)}: rating {value!r} is not a number: {show(line)}")


# ----------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------
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


def _no_nulls(col: pa.ChunkedArray, role: str, name: str, locate) -> None:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        (loc, _, text), = locate([row])
        raise DataError(f"{loc}: missing (null) {role} in column {name!r}: {text}")


def _parquet_ids(col: pa.ChunkedArray, role: str, name: str, locate, path: str) -> np.ndarray:
    _no_nulls(col, role + " id", name, locate)
    t = col.type
    if pa.types.is_dictionary(t):
        col = pc.cast(col, t.value_type)
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


# ----------------------------------------------------------------------------------------
# Timestamps
# ----------------------------------------------------------------------------------------
def _timestamps(col: pa.ChunkedArray, name: str, locate: Callable, path: str) -> np.ndarray:
    """int64 [n] Unix seconds of a timestamp column: integers as they are, floats floored,
    Arrow timestamps/dates and ISO text (UTC without an offset) converted. A value that is
    none of these raises naming its line (row)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    _no_nulls(pa.chunked_array([col]), "timestamp", name, locate)
    t = col.type
    if pa.types.is_dictionary(t):
        col = pc.cast(col, t.value_type)
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
    start = np.ones(skey.size, dtype=bool)
    start[1:] = ~dup
    group = np.cumsum(start) - 1  # group id of each sorted row
    n_groups = int(group[-1]) + 1
    if policy == "last":
        end = np.ones(skey.size, dtype=bool)
        end[:-1] = start[1:]
        keep = np.sort(order[end])
        ratings = raw.ratings[keep]
        ts = raw.timestamps[keep] if raw.timestamps is not None else None
    else:  # mean, in float64, kept at the first occurrence's position
        sums = np.bincount(group, weights=raw.ratings[order].astype(np.float64), minlength=n_groups)
        counts = np.bincount(group, minlength=n_groups)
        firsts = order[start]
        pos = np.argsort(firsts, kind="stable")
        keep = firsts[pos]
        ratings = (sums / counts)[pos].astype(np.float32)
        ts = None
        if raw.timestamps is not None:  # the pair's latest time: when its mean was complete
            latest = np.full(n_groups, np.iinfo(np.int64).min, dtype=np.int64)
            np.maximum.at(latest, group, raw.timestamps[order])
            ts = latest[pos]
    out = RawRatings(raw.users[keep], raw.items[keep], ratings, raw.source, timestamps=ts)
    out._codes = (uu, uc[keep], iu, ic[keep])
    return out


def _plain(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(int(v))
