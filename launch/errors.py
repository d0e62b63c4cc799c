"""Turning expected failures into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a refused action: printed as ``svdfill: error: <message>``, exit code 2.

    Data readers raise :class:`svdfill.data.errors.DataError` (a subclass of ValueError);
    config loading raises :class:`svdfill.config.ConfigError`. Both are reported the same way.
    """


def run_reporting_errors(fn: Callable[[], int | None]) -> int:
    from svdfill.config import ConfigError

    try:
        from svdfill.data.errors import DataError
    except ImportError:  # pragma: no cover - during bootstrap
        DataError = UserError  # type: ignore[misc,assignment]
    try:
        rc = fn()
    except (UserError, ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"svdfill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdfill: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
