"""A backup or a restore of a state whose user content is encrypted at rest
(security.data_at_rest): the content is read through the open data volume (by the service
account when its services hold it open) and staged inside it, never in plaintext beside it;
the backup is sealed with the key-encryption key, so a restore needs that key; a restore makes
the new state a volume of its own."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.backup.archive import BackupError, KeySource
from appliance.config import ApplianceSettings
from appliance.security import data_volume
from appliance.security.host import this_host_fingerprint as host
from appliance.security.keys import new_data_key

# The parts that live inside the data volume (backup_parts' names).
USER_PARTS = frozenset({"rag", "conversations", "training", "sealed-audit"})


def encrypted(settings: ApplianceSettings) -> bool:
    return settings.security.data_at_rest.enabled


@dataclass(frozen=True)
class Reader:
    """Who reads the state for a backup: this process, or (`account`) a child of it become the
    service account, whose services hold the data volume open (FUSE without allow_other lets
    no other account in, not even root); `scratch` is where plaintext scratch files
    (SQLite snapshots) may wait."""

    scratch: Path
    account: str | None = None


@contextlib.contextmanager
def readable_user_data(settings: ApplianceSettings, source: KeySource) -> Iterator[Reader]:
    """For a backup: the user content readable (the volume opened under its policy for the
    backup's length, unless the services hold it open)."""
    if not encrypted(settings):
        yield Reader(settings.state_dir)
        return
    if source.kek is None:
        raise BackupError(
            "the user data is encrypted at rest under the key-encryption key: its backup is "
            "sealed with that key too (leave out --passphrase-file)"
        )
    opened = data_volume.open_volume(settings)
    try:
        yield Reader(settings.layout.data, None if _readable(settings) else _holder(settings))
    finally:
        if opened:
            data_volume.close_volume(settings)


def _readable(settings: ApplianceSettings) -> bool:
    try:
        (settings.layout.data / ".").stat()
    except PermissionError:
        return False
    return True


def _holder(settings: ApplianceSettings) -> str:
    """The account the open data volume answers, which root can become; BackupError if not."""
    account = data_volume.service_account(settings)
    if os.geteuid() != 0 or account == pwd.getpwuid(0).pw_name:
        raise BackupError(
            f"the data volume is open for another account: back up as it, e.g. "
            f"`runuser -u {account} -- appliance backup ...`"
        )
    return account


@contextlib.contextmanager
def restore_volume(settings: ApplianceSettings) -> Iterator[Path | None]:
    """For a restore into an empty state: a new data volume, open, to stage the user content
    in (yielded; None when data_at_rest is off). Once the restore put the keys in place, its
    key is wrapped by the key-encryption key there and released by a policy for this host and
    the service account; nothing of it is left when the restore fails."""
    if not encrypted(settings):
        yield None
        return
    vol = data_volume.volume(settings)
    key = new_data_key()
    vol.create(key)
    try:
        vol.mount(key)
        yield settings.layout.data
        # The backup's record wraps the key of its own host's volume: replaced by this one's.
        settings.layout.data_volume_key.unlink(missing_ok=True)
        account = data_volume.service_account(settings)
        data_volume.seal_key(settings, key, data_volume.PolicyTerms(account, [host()]))
    except BaseException:
        vol.unmount()
        shutil.rmtree(vol.cipher_dir, ignore_errors=True)
        raise
    vol.unmount()
