"""SQLite connections of the knowledge bases' databases (the registry, keyword indexes), kept open
between calls, and their write transactions."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ConnectionPool:
    """Connections to one database, each used by one thread at a time and kept open after.

    Opening a connection costs several file-system round trips (the file, its `-wal` and `-shm`
    files, their locks): a few tenths of a millisecond on a disk, about a millisecond each
    through a gocryptfs volume's FUSE daemon, several per query. A pool holds about as many
    connections as threads used it at once. `close` closes the idle ones and those in use when
    their call ends, so the files are closed (a volume can unmount); the pool opens new ones if
    used after.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """`connect` opens a connection in autocommit mode (isolation_level=None) that other
        threads may use (check_same_thread=False)."""
        self._connect = connect
        self._idle: list[sqlite3.Connection] = []
        # Bumped by close: a connection taken before goes back closed, not idle.
        self._generation = 0
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this thread alone while held."""
        with self._lock:
            generation = self._generation
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
        keep = False
        try:
            yield db
            keep = not db.in_transaction
        finally:
            with self._lock:
                # After an error the connection's state is unknown: a new one costs little.
                keep = keep and generation == self._generation
                if keep:
                    self._idle.append(db)
            if not keep:
                db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock up front, so a
        read-then-write (the current version, then its replacement) cannot interleave with
        another."""
        with self.connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every connection: the idle ones now, those in use when their call ends."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for db in idle:
            db.close()
