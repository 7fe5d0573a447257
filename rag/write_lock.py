"""The knowledge bases' write lock: every write shares it, a backup takes it alone.

A lock file beside the registry, held with flock(2): it works across processes (the gateway
writes, `appliance backup` copies) and is released when its holder dies, so a crash never leaves
the knowledge bases locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "write.lock"


@contextlib.contextmanager
def write_lock(root: Path, *, exclusive: bool = False) -> Iterator[None]:
    """Hold the lock of the knowledge bases in `root`: shared (a write: writes run side by side)
    or exclusive (a snapshot: no write is half done while it holds the lock)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Its own open file for every holder: flock locks belong to the open file, so threads of
    # one process each get (and wait for) the lock like separate processes do.
    fd = os.open(root / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
