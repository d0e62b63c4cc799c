"""Turning expected failures into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import sys
from typing import Callable

from svdfill.errors import UserError, os_error_message  # noqa: F401  (raised and printed here)


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
