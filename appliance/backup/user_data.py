"""A backup or a restore of a state whose user content is encrypted at rest
(security.data_at_rest): the content is read through the open data volume and staged inside
it, never in plaintext beside it; the backup is sealed with the key-encryption key, so a
restore needs that key; a restore makes the new state a volume of its own."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from appliance.backup.archive import BackupError, KeySource
from appliance.config import ApplianceSettings
from appliance.security import data_volume
from appliance.security.host import this_host_fingerprint as host
from appliance.security.keys import new_data_key

# The parts that live inside the data volume (backup_parts' names).
USER_PARTS = frozenset({"rag", "conversations", "training"})


def encrypted(settings: ApplianceSettings) -> bool:
    return settings.security.data_at_rest.enabled


@contextlib.contextmanager
def readable_user_data(settings: ApplianceSettings, source: KeySource) -> Iterator[Path]:
    """For a backup: the user content readable (the volume opened under its policy for the
    backup's length, unless the services hold it open); yields where plaintext scratch files
    (SQLite snapshots) may wait."""
    if not encrypted(settings):
        yield settings.state_dir
        return
    if source.kek is None:
        raise BackupError(
            "the user data is encrypted at rest under the key-encryption key: its backup is "
            "sealed with that key too (leave out --passphrase-file)"
        )
    opened = data_volume.open_volume(settings)
    try:
        try:
            (settings.layout.data / ".").stat()
        except PermissionError:
            account = data_volume.service_account(settings)
            raise BackupError(
                f"the data volume is open for another account: back up as it, e.g. "
                f"`runuser -u {account} -- appliance backup ...`"
            ) from None
        yield settings.layout.data
    finally:
        if opened:
            data_volume.close_volume(settings)


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
