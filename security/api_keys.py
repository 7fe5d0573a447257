"""API keys: shown once, stored as hashes, with a user, a role, groups, an expiry and revocation.

The gateway asks every request for a key once any key exists; an appliance with no keys at all
is in single-user mode (the local administrator), which is what the CPU demo starts in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from appliance.security.secret_files import replace_secret_file

from appliance.errors import ApplianceError

KEY_PREFIX = "ak-"
Role = Literal["admin", "user"]
# "api": made by an administrator for a script; "session": handed out when a user signs in with
# a password (the web app), short-lived and revoked at sign-out.
KeyKind = Literal["api", "session"]


class KeyRefused(ApplianceError):
    """A request's API key is missing, unknown, expired or revoked."""

    def __init__(self, message: str, reason: str = "unknown key", user: str = ""):
        super().__init__(message)
        self.reason = reason  # short and fixed, for the audit log's counts of refusals
        self.user = user  # the key's user, where the key is known


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    user: str
    groups: frozenset[str] = frozenset()
    admin: bool = False
    key_id: str = ""


@dataclass
class ApiKeyRecord:
    """One key as stored: its id and hash, never the key itself."""

    key_id: str
    key_hash: str
    user: str
    role: Role = "user"
    groups: list[str] = field(default_factory=list)
    created_at: str = ""
    expires_at: str | None = None
    revoked_at: str | None = None
    kind: KeyKind = "api"

    def expired(self, now: dt.datetime) -> bool:
        return bool(self.expires_at) and dt.datetime.fromisoformat(self.expires_at) <= now

    def principal(self) -> Principal:
        return Principal(self.user, frozenset(self.groups), self.role == "admin", self.key_id)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ApiKeyStore:
    """The keys file (JSON, mode 0600); rewritten atomically on every change."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[ApiKeyRecord]:
        if not self.path.exists():
            return []
        return [ApiKeyRecord(**r) for r in json.loads(self.path.read_text())["keys"]]

    def _write(self, records: list[ApiKeyRecord]) -> None:
        data = json.dumps({"keys": [asdict(r) for r in records]}, indent=1)
        replace_secret_file(self.path, data.encode())

    def create(
        self,
        user: str,
        role: Role = "user",
        groups: list[str] | None = None,
        expires_at: dt.datetime | None = None,
        kind: KeyKind = "api",
    ) -> tuple[str, ApiKeyRecord]:
        """A new key for `user`: (the key, shown this once; its stored record). Sessions that
        have ended are dropped from the file on the way (API keys stay, for the record)."""
        key_id = secrets.token_hex(4)
        secret = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"
        record = ApiKeyRecord(
            key_id=key_id,
            key_hash=_hash(secret),
            user=user,
            role=role,
            groups=sorted(groups or []),
            created_at=_now().isoformat(timespec="seconds"),
            expires_at=expires_at.isoformat(timespec="seconds") if expires_at else None,
            kind=kind,
        )
        now = _now()
        kept = [
            r for r in self.records() if r.kind == "api" or not (r.revoked_at or r.expired(now))
        ]
        self._write([*kept, record])
        return secret, record

    def revoke(self, key_id: str, user: str | None = None) -> ApiKeyRecord:
        """Revoke a key (only one of `user`'s, when given)."""
        records = self.records()
        for r in records:
            if r.key_id == key_id and user in (None, r.user):
                r.revoked_at = r.revoked_at or _now().isoformat(timespec="seconds")
                self._write(records)
                return r
        raise KeyRefused(f"no API key with id {key_id}")

    def revoke_user(self, user: str) -> int:
        """Revoke every key of `user` (an account removed or disabled); how many were live."""
        records, now, count = self.records(), _now().isoformat(timespec="seconds"), 0
        for r in records:
            if r.user == user and not r.revoked_at:
                r.revoked_at, count = now, count + 1
        self._write(records)
        return count

    def authenticate(self, secret: str | None) -> Principal:
        """The principal of a presented key; KeyRefused says why not."""
        return self.check(secret).principal()

    def check(self, secret: str | None) -> ApiKeyRecord:
        """The record of a presented key that is valid now; KeyRefused says why not."""
        if not secret:
            raise KeyRefused("an API key is required (Authorization: Bearer <key>)", "no key")
        presented = _hash(secret)
        for r in self.records():
            if hmac.compare_digest(r.key_hash, presented):
                if r.revoked_at:
                    message = f"API key {r.key_id} was revoked at {r.revoked_at}"
                    raise KeyRefused(message, "revoked key", r.user)
                if r.expired(_now()):
                    message = f"API key {r.key_id} expired at {r.expires_at}"
                    raise KeyRefused(message, "expired key", r.user)
                return r
        raise KeyRefused("unknown API key")
