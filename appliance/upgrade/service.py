"""`appliance upgrade`: refuse while the stack runs, take a backup with appliance.backup, run
the pending migrations, record the new schema version."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from appliance.backup.archive import KeySource
from appliance.backup.snapshot import write_backup
from appliance.config import ApplianceSettings
from appliance.daemon import read_pid
from appliance.errors import ApplianceError
from appliance.state_version import SCHEMA_VERSION, state_version
from appliance.upgrade.runner import migrate, pending_steps
from appliance.upgrade.steps import Step


@dataclass(frozen=True)
class UpgradeResult:
    """What an upgrade did: the versions, the backup taken first, the steps run."""

    source: int | None
    target: int
    backup: Path | None
    steps: list[Step]


def running_services(settings: ApplianceSettings) -> list[str]:
    """The stack's services that run on this host: a live pid file, or the gateway's port."""
    pidfiles = {
        "gateway": settings.state_dir / "gateway.pid",
        "webapp": settings.state_dir / "webapp.pid",
        "supervisor": settings.layout.supervisor_pid,
    }
    found = [name for name, path in pidfiles.items() if read_pid(path) is not None]
    url = urlsplit(settings.gateway_url)
    host = "127.0.0.1" if url.hostname in (None, "0.0.0.0", "::") else url.hostname
    try:
        with socket.create_connection((host, url.port or 80), timeout=1):
            if "gateway" not in found:
                found.append("gateway")
    except OSError:
        pass
    return found


def backup_path(backup_dir: Path, version: int | None) -> Path:
    """`pre-upgrade-v<from>-<UTC time>.backup` in `backup_dir`: sorts by time, names the schema."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return backup_dir / f"pre-upgrade-v{version}-{stamp}.backup"


def upgrade(
    settings: ApplianceSettings,
    backup_dir: Path,
    source: Callable[[], KeySource],
    progress: Callable[[str], None] = lambda line: None,
) -> UpgradeResult:
    """Migrate the state directory in place. The stack must be stopped: its processes keep the
    stores open (SQLite connections, Chroma's in-memory index) and would write the old format
    over a migrated one. `source` gives the backup's key; it is asked only when there is data."""
    running = running_services(settings)
    if running:
        raise ApplianceError(
            f"the stack is running ({', '.join(running)}): stop it (`appliance down`, or "
            "`systemctl stop appliance-*` for an installed one), then run `appliance upgrade` "
            "again"
        )
    version = state_version(settings.state_dir)
    steps = pending_steps(settings)
    backup = None
    if steps:
        key = source()  # first: a missing key refuses before anything is said or written
        backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        backup = backup_path(backup_dir, version)
        progress(f"backup of the state before the upgrade: {backup}")
        write_backup(settings, backup, key)
    done = migrate(settings, progress=progress)
    return UpgradeResult(version, SCHEMA_VERSION, backup, done)
