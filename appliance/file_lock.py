"""An flock(2) lock on a file: across processes, and released when its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def flocked(path: Path, *, exclusive: bool = True) -> Iterator[None]:
    """Hold the lock of `path` (made 0600 if missing; its folder 0700): exclusive, or shared
    with other shared holders. Every holder opens the file itself: flock locks belong to the open
    file, so threads of one process each get (and wait for) the lock like separate processes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
