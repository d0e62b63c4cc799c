"""Turning expected failures into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a refused action: printed as ``svdfill: error: <message>``, exit code 2.

    Data readers raise :class:`svdfill.data.errors.DataError` (a subclass of ValueError);
    config loading raises :class:`svdfill.config.ConfigError`. Both are reported the same way.
    """


def os_error_message(e: OSError) -> str:
    """``PATH: reason`` for an OSError that names its file (``[Errno 2] … 'PATH'`` reads as
    noise to a user), else the error's own text."""
    if e.filename is None:
        return str(e)
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{where}: {e.strerror or type(e).__name__}"


def run_reporting_errors(fn: Callable[[], int | None]) -> int:
    from svdfill.config import ConfigError

    try:
        from svdfill.data.errors import DataError
    except ImportError:  # pragma: no cover - during bootstrap
        DataError = UserError  # type: ignore[misc,assignment]
    try:
        rc = fn()
    except (UserError, ConfigError, DataError) as e:
        print(f"svdfill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: which one and why, no traceback
        print(f"svdfill: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdfill: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
