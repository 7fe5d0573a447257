"""disk_full: a write refused for want of space, however the store that met it wrapped it."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from appliance.errors import disk_full


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the store failed") from exc
    except RuntimeError as outer:
        return outer


def _sqlite_full() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL
    return exc


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (_raised_from(OSError(errno.ENOSPC, "No space left on device")), True),
        (_sqlite_full(), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (sqlite3.OperationalError("database is locked"), False),
        (ValueError("no"), False),
    ],
)
def test_disk_full(exc, full):
    assert disk_full(exc) is full
