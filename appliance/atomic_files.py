"""Files replaced atomically (a reader sees the old content or the new, never half of it), and
JSON read back leniently. Standard library only: the installer uses it before the stack runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` (and `mode`, when given) in one rename; creates its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named per process: two writers of one file never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created no wider than `mode`: a secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if mode is not None:
        os.chmod(tmp, mode)
    tmp.replace(path)


def write_if_changed(path: Path, text: str, mode: int | None = None) -> bool:
    """`write_text` unless the file already holds `text` (and `mode`); True when written, so
    a re-run that changes nothing can say so and a daemon is not restarted for nothing."""
    try:
        same_mode = mode is None or (path.stat().st_mode & 0o777) == mode
        if same_mode and path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text, mode)
    return True


def write_json(path: Path, data: Any, indent: int = 1) -> None:
    """`write_text` of `data` as JSON."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
