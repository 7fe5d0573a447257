"""The state directory's schema version: `<state_dir>/schema.json`, written atomically, and the
checks that keep code and data of different versions apart.

Version 0 is the state of releases before the record existed: a state directory that holds
data but no schema.json. A fresh state directory (no data yet) gets SCHEMA_VERSION when first
stamped. Standard library only: the installer and every entry point read it before the stack
is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from appliance import __version__
from appliance.atomic_files import write_text
from appliance.errors import ApplianceError

SCHEMA_FILE = "schema.json"
# The schema this code reads and writes; appliance.upgrade's steps lead up to it.
SCHEMA_VERSION = 3
UNVERSIONED = 0
# What holds data in a state directory (relative paths): their presence without a record means
# the directory was made before versioning. Logs, sockets, pid files and the local cluster's
# files are written again at every start and say nothing about the stored formats.
DATA_PATHS = (
    "keys",
    "audit",
    "rag",
    "conversations",
    "training",
    "store",
    "usage",
    "webapp",
    "catalog.yaml",
)


class StateVersionError(ApplianceError):
    """The state directory's schema differs from the one this code reads."""


@dataclass(frozen=True)
class SchemaRecord:
    """What schema.json holds: the schema version and the appliance version that wrote it."""

    version: int
    written_by: str


def schema_path(state_dir: Path) -> Path:
    return state_dir / SCHEMA_FILE


def holds_data(state_dir: Path) -> bool:
    """Whether any stored format is present (a folder counts when it is not empty)."""
    for name in DATA_PATHS:
        path = state_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def read_record(state_dir: Path) -> SchemaRecord | None:
    """The record in schema.json; None when there is none. A damaged record is an error, never
    guessed at: the version decides which code may touch the data."""
    path = schema_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise  # the caller decides: an unreadable state is not a damaged one
    except (OSError, ValueError) as exc:
        raise StateVersionError(f"cannot read {path}: {exc}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateVersionError(f"{path} holds no valid schema version: {data!r}")
    return SchemaRecord(version, str(data.get("written_by", "")))


def state_version(state_dir: Path) -> int | None:
    """The schema version of the state directory: its record's, UNVERSIONED for data without
    a record, None for a fresh (missing or empty of data) directory."""
    record = read_record(state_dir)
    if record is not None:
        return record.version
    return UNVERSIONED if holds_data(state_dir) else None


def write_record(state_dir: Path, version: int) -> None:
    """Record `version` as the state directory's schema, in one rename."""
    record = {"version": version, "written_by": __version__}
    write_text(schema_path(state_dir), json.dumps(record, indent=1) + "\n", 0o600)


def refuse_newer(state_dir: Path) -> None:
    """Raise when the state was written by a newer appliance: old code never runs on new data."""
    record = read_record(state_dir)
    if record is not None and record.version > SCHEMA_VERSION:
        raise StateVersionError(
            f"the state directory {state_dir} has schema version {record.version} (written by "
            f"appliance {record.written_by or 'unknown'}), newer than the version "
            f"{SCHEMA_VERSION} this appliance {__version__} reads. Install that release (or a "
            "newer one) again, or restore a backup made by this release; this one will not "
            "touch the data."
        )


def require_current(state_dir: Path) -> None:
    """Before a service opens the state: a fresh directory is stamped with SCHEMA_VERSION, a
    current one passes, a newer one or an older one is refused (the older with what to run)."""
    refuse_newer(state_dir)
    version = state_version(state_dir)
    if version is None:
        write_record(state_dir, SCHEMA_VERSION)
    elif version < SCHEMA_VERSION:
        raise StateVersionError(
            f"the state directory {state_dir} has schema version {version}, older than the "
            f"version {SCHEMA_VERSION} this appliance {__version__} reads: run `appliance "
            "upgrade` (it takes a backup first), then start again."
        )
