"""The knowledge bases' write lock: every write shares it, a backup takes it alone.

A lock file beside the registry, held with flock(2): it works across processes (the gateway
writes, `appliance backup` copies) and is released when its holder dies, so a crash never leaves
the knowledge bases locked.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from appliance.file_lock import flocked

LOCK_FILE = "write.lock"


def write_lock(root: Path, *, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of the knowledge bases in `root`: shared (a write: writes run side by side)
    or exclusive (a snapshot: no write is half done while it holds the lock)."""
    return flocked(root / LOCK_FILE, exclusive=exclusive)
