"""The data volume: the user content of the state directory (knowledge bases, conversations,
fine-tuning files, uploads, the services' scratch files) in one gocryptfs volume, whose key the
key-encryption key wraps and a signed policy releases: to one service account, on the listed
hosts, until a date. Made by `appliance data init` (the installer), opened by the services as
they start, closed at `appliance down`."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.security.gocryptfs import EncryptedVolume, VolumeError, mounts_under, unmount_at
from appliance.security.host import HostError, this_host_fingerprint
from appliance.security.keys import (
    KeyEncryptionKey,
    KeyWrapError,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from appliance.security.policy import (
    LoadPolicy,
    PolicyRefused,
    check_policy,
    load_signing_key,
    sign_policy,
)
from appliance.security.secret_files import SecretFileError, replace_secret_file
from appliance.security.signers import public_key_file, trusted_signers

from appliance.atomic_files import read_json_object
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.file_lock import flocked

# The policy's subject (LoadPolicy.model_id): a model's policy can never open the data.
SUBJECT = "appliance-data-volume"
_CONTEXT = b"data-volume:"
_LOCK = ".data-volume.lock"
CLOSE_PATIENCE_S = 10.0
# What older states (or one made with data_at_rest off) keep in plaintext at the state's top.
USER_CONTENT = ("rag", "conversations", "training", "webapp")


class DataSealed(ApplianceError):
    """The data volume stays sealed: no key-encryption key, a policy that refuses, no volume,
    plaintext left beside it. The message says why and what to do."""


def volume(settings: ApplianceSettings) -> EncryptedVolume:
    layout = settings.layout
    return EncryptedVolume(layout.vault, layout.data)


def service_account(settings: ApplianceSettings) -> str:
    """The account the services run as: the one the data policy must name."""
    return settings.security.service_user or pwd.getpwuid(os.geteuid()).pw_name


@dataclass(frozen=True)
class PolicyTerms:
    """Whom, where and until when a data policy lets the volume open."""

    account: str
    hosts: list[str]
    not_after: dt.datetime | None = None

    def signed(self, settings: ApplianceSettings) -> dict[str, Any]:
        try:
            key = load_signing_key(settings.signing_key_file)
        except SecretFileError as exc:
            raise DataSealed(f"cannot sign the data policy: {exc}") from None
        policy = LoadPolicy(
            model_id=SUBJECT,
            users=[self.account],
            hosts=self.hosts,
            not_after=self.not_after,
            issued_at=dt.datetime.now(dt.UTC),
            issuer=public_key_file(settings).read_text().strip()[:16],
        )
        return dict(sign_policy(policy, key))


def init_volume(settings: ApplianceSettings, terms: PolicyTerms) -> None:
    """Make the data volume: a random key, wrapped by the key-encryption key, with its policy
    signed by the policy signing key. Refuses when one is made already."""
    layout = settings.layout
    if layout.data_volume_key.exists() or volume(settings).exists():
        raise DataSealed(f"the data volume is made already ({layout.data_volume_key})")
    _kek(settings)  # said before anything is made
    key = new_data_key()
    try:
        volume(settings).create(key)
    except VolumeError as exc:
        raise DataSealed(str(exc)) from None
    seal_key(settings, key, terms)


def seal_key(settings: ApplianceSettings, key: bytes, terms: PolicyTerms) -> None:
    """Record the data volume's `key`: wrapped by the key-encryption key, released by a policy
    of `terms` signed now."""
    record = {
        "wrapped": wrap_data_key(_kek(settings), key, _CONTEXT + SUBJECT.encode()),
        "policy": terms.signed(settings),
    }
    _write_record(settings, record)


def resign(settings: ApplianceSettings, terms: PolicyTerms) -> None:
    """Replace the data volume's policy (new account, hosts or validity); the key stays."""
    record = _record(settings)
    record["policy"] = terms.signed(settings)
    _write_record(settings, record)


def policy_terms(settings: ApplianceSettings) -> LoadPolicy:
    """The data volume's policy as recorded (its signature not checked: for display)."""
    return LoadPolicy.model_validate(_record(settings)["policy"]["policy"])


def release_key(
    settings: ApplianceSettings,
    *,
    account: str | None = None,
    host: str | None = None,
    now: dt.datetime | None = None,
) -> bytes:
    """The data volume's key, if its signed policy lets `account` (default: the service
    account) have it on `host` (default: this host) `now`; DataSealed saying why if not."""
    record = _record(settings)
    kek = _kek(settings)
    account = account or service_account(settings)
    try:
        host = host or this_host_fingerprint()
    except HostError as exc:
        raise DataSealed(f"the user data stays sealed: {exc}") from None
    try:
        check_policy(
            record.get("policy"),
            trusted_signers=trusted_signers(settings),
            model_id=SUBJECT,
            user=account,
            roles=[],
            host=host,
            now=now,
        )
    except PolicyRefused as exc:
        raise DataSealed(
            f"the user data stays sealed: its policy refuses (rule '{exc.rule}'): {exc.reason}. "
            "`appliance data policy` signs a new one (see docs/security.md)"
        ) from None
    try:
        return unwrap_data_key(kek, record.get("wrapped"), _CONTEXT + SUBJECT.encode())
    except KeyWrapError as exc:
        raise DataSealed(f"the user data stays sealed: {exc}") from None


def open_volume(settings: ApplianceSettings, *, check_leftovers: bool = True) -> bool:
    """Mount the data volume where the user content lives, once its policy released the key;
    nothing to do when it is mounted. True when this call mounted it. Refuses (DataSealed) while
    user content lies in plaintext beside it: `appliance data seal` moves it in."""
    vol = volume(settings)
    with flocked(settings.layout.keys / _LOCK):
        if vol.mounted():
            return False
        key = openable(settings, check_leftovers=check_leftovers)
        try:
            vol.mount(key)
        except VolumeError as exc:
            raise DataSealed(f"the user data stays sealed: {exc}") from None
    for path in (settings.layout.tmp, settings.webapp_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return True


def openable(settings: ApplianceSettings, *, check_leftovers: bool = True) -> bytes:
    """The data volume's key if the services could open it now (as the service account, on this
    host); DataSealed saying why not. What starts the services asks first, so a refusal is said
    at once rather than by services that keep exiting."""
    leftovers = plaintext_leftovers(settings) if check_leftovers else []
    if leftovers:
        names = ", ".join(str(p) for p in leftovers)
        raise DataSealed(
            f"user content lies unencrypted in {names}: `appliance data seal` moves it into "
            "the encrypted data volume (the services start only once it is in)"
        )
    vol = volume(settings)
    if not vol.exists():
        raise DataSealed(
            f"security.data_at_rest is on but there is no data volume in {vol.cipher_dir}: "
            "`appliance data init` makes one"
        )
    if settings.rag.persist_dir is not None:
        raise DataSealed(
            "rag.persist_dir keeps knowledge bases outside the encrypted data volume: "
            "unset it while security.data_at_rest is on"
        )
    return release_key(settings)


def close_volume(settings: ApplianceSettings) -> bool:
    """Unmount the knowledge bases' volumes, then the data volume (after the services stopped);
    True when the data volume was mounted."""
    vol = volume(settings)
    with flocked(settings.layout.keys / _LOCK):
        try:
            # The knowledge bases' volumes first: beside it, and inside it where an older
            # version mounted them.
            inner = mounts_under(settings.layout.kb_mounts)
            if vol.mounted():
                inner += mounts_under(vol.mount_dir)
            for point in inner:
                unmount_at(point)
            if not vol.mounted():
                return False
            _unmount_when_released(vol, patient=bool(inner))
        except VolumeError as exc:
            raise DataSealed(f"{exc} (a process still uses it)") from None
    return True


def _unmount_when_released(vol: EncryptedVolume, *, patient: bool) -> None:
    # A knowledge base's gocryptfs daemon holds a file in the data volume when the process
    # that mounted it kept its scratch files there (use_private_tmp: the output file of
    # gocryptfs._run), and lets go of it a moment after its own unmount returns (measured:
    # busy at once, free within 2 s); so the data volume is tried again.
    deadline = time.monotonic() + (CLOSE_PATIENCE_S if patient else 0)
    while True:
        try:
            vol.unmount()
            return
        except VolumeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def use_private_tmp(settings: ApplianceSettings) -> None:
    """Point this process's scratch files (Python's tempfile: uploads being parsed, the
    multipart parser's spooled files, OCR) into the data volume. Not TMPDIR: the Slurm jobs
    the gateway submits inherit its environment, and would hold the volume open (or look for
    it on another node)."""
    import tempfile

    tempfile.tempdir = str(settings.layout.tmp)


def plaintext_leftovers(settings: ApplianceSettings) -> list[Path]:
    """User content kept in plaintext at the state's top (made before data_at_rest was on)."""
    root = settings.state_dir
    return [root / name for name in USER_CONTENT if (root / name).exists()]


def seal_leftovers(settings: ApplianceSettings) -> list[Path]:
    """Move the plaintext user content into the (open) data volume, then delete its plaintext;
    returns what moved. The deleted copies' blocks are freed, not overwritten (docs/security.md)."""
    if not volume(settings).mounted():
        raise DataSealed("the data volume is not open")
    moved = []
    for old in plaintext_leftovers(settings):
        new = settings.layout.data / old.name
        if new.exists() and any(new.iterdir()):
            raise DataSealed(f"both {old} and {new} hold data: merge them by hand")
        if new.exists():
            new.rmdir()
        # Across file systems: shutil.move copies into the volume, then deletes the original.
        shutil.move(old, new)
        moved.append(old)
    return moved


def seal_plaintext(settings: ApplianceSettings, terms: PolicyTerms) -> list[Path]:
    """Move the user content an unencrypted state kept into the data volume (made with `terms`
    if missing), opened for it and closed after unless it was open; what moved."""
    if not plaintext_leftovers(settings):
        return []
    if not volume(settings).exists():
        init_volume(settings, terms)
    opened = open_volume(settings, check_leftovers=False)
    try:
        return seal_leftovers(settings)
    finally:
        if opened:
            close_volume(settings)


def still_plaintext(settings: ApplianceSettings) -> bool:
    """Whether data_at_rest is on but the user content still lies where an unencrypted state
    keeps it (no data volume yet): the state is read as unencrypted until it is sealed."""
    return (
        settings.security.data_at_rest.enabled
        and not volume(settings).exists()
        and bool(plaintext_leftovers(settings))
    )


def as_found(settings: ApplianceSettings) -> ApplianceSettings:
    """The settings that find the user content where it lies: data_at_rest off for a state
    still unencrypted (before `appliance data seal`), else `settings` as they are."""
    if not still_plaintext(settings):
        return settings
    security = settings.security.model_copy(
        update={
            "data_at_rest": settings.security.data_at_rest.model_copy(update={"enabled": False})
        }
    )
    return settings.model_copy(update={"security": security})


def _record(settings: ApplianceSettings) -> dict[str, Any]:
    path = settings.layout.data_volume_key
    record = read_json_object(path)
    if record is None:
        why = (
            "is missing (`appliance data init` makes the data volume)"
            if not path.exists()
            else "cannot be read, or holds no key record"
        )
        raise DataSealed(f"the user data stays sealed: its wrapped key {path} {why}")
    return record


def _write_record(settings: ApplianceSettings, record: dict[str, Any]) -> None:
    path = settings.layout.data_volume_key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_secret_file(path, json.dumps(record, indent=1).encode())


def _kek(settings: ApplianceSettings) -> KeyEncryptionKey:
    try:
        return KeyEncryptionKey.from_key_file(settings.kek_file)
    except SecretFileError as exc:
        raise DataSealed(
            f"the user data stays sealed: no key-encryption key ({exc}); the data volume's key "
            "is wrapped by it"
        ) from None
