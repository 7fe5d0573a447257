"""SQLite write transactions of the knowledge bases' databases (the registry, keyword indexes)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(connect: Callable[[], sqlite3.Connection]) -> Iterator[sqlite3.Connection]:
    """A write transaction on a new connection: BEGIN IMMEDIATE takes the write lock up front,
    so a read-then-write (the current version, then its replacement) cannot interleave with
    another. `connect` must give a connection in autocommit mode (isolation_level=None)."""
    db = connect()
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()
