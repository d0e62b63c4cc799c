"""Errors that every layer raises for the user to read (a leaf module: imports nothing of
svdfill). The CLI (:mod:`svdfill.launch.errors`) turns them into one line and exit code 2."""

from __future__ import annotations


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
