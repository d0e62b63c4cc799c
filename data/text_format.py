"""Text rating files: format and separator detection from the name and first line, the
layout (header, columns, field count), the fast multi-threaded ``pyarrow.csv`` read, and the
slow line-by-line scan that names the exact bad line (only when the fast read fails)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from svdfill.data.columns import _no_time_column, _pick_column, _timestamps
from svdfill.data.errors import DataError, show, where
from svdfill.data.sources import Part


MOVIELENS_SCALE = (1.0, 5.0)
MOVIELENS_CSV_SCALE = (0.5, 5.0)

# Candidate separators, in the order auto-detection prefers them.
_SEPARATORS = ("::", "\t", ",", ";", "|", " ")
_SEP_NAMES = {"\t": "tab", " ": "space", ",": "comma", ";": "semicolon", "|": "pipe", "::": "'::'"}
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_ML100K_NAME = re.compile(r"^u(\d|[ab])?\.(data|base|test)$")
_TRANSLATED_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character separators


def _sep_name(sep: str) -> str:
    return _SEP_NAMES.get(sep, repr(sep))


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
