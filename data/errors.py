"""The one exception type of the data layer."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Unusable input data. The message names the file, the 1-based line (or Parquet row)
    and the problem, plus the offending text for text files, e.g.::

        ratings.dat:17: expected 3 or 4 fields separated by '::', got 2: '1::1193'
    """


def where(path: str | os.PathLike, line: int | None = None, *, row: bool = False) -> str:
    """``path:line`` (text files) or ``path: row N`` (Parquet) for the start of a message."""
    if line is None:
        return f"{path}"
    return f"{path}: row {line}" if row else f"{path}:{line}"


def show(text: str | bytes, limit: int = 120) -> str:
    """The offending text, quoted and shortened so a binary or huge line stays readable."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.rstrip("\r\n")
    if len(text) > limit:
        text = text[:limit] + "…"
    return repr(text)
