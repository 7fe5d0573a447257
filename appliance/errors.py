"""Errors meant for the operator: the CLI prints their message without a traceback."""

import errno
import sqlite3

# A write refused for want of space: the disk, or the account's quota.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ApplianceError(Exception):
    """A problem the user can act on; its message says what went wrong and what to do."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is a write refused for want of space
    (ENOSPC or EDQUOT, or SQLite's SQLITE_FULL)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS:
            return True
        if getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        cause = cause.__cause__ or cause.__context__
    return False
