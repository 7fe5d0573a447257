"""API keys: shown once, stored as hashes, with a user, a role, groups, an expiry and revocation.

The gateway asks every request for a key once any key exists; an appliance with no keys at all
is in single-user mode (the local administrator), which is what the CPU demo starts in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from appliance.errors import ApplianceError

KEY_PREFIX = "ak-"
Role = Literal["admin", "user"]


class KeyRefused(ApplianceError):
    """A request's API key is missing, unknown, expired or revoked."""


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(r) for r in records]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(
        self,
        user: str,
        role: Role = "user",
        groups: list[str] | None = None,
        expires_at: dt.datetime | None = None,
    ) -> tuple[str, ApiKeyRecord]:
        """A new key for `user`: (the key, shown this once; its stored record)."""
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
        )
        self._write([*self.records(), record])
        return secret, record

    def revoke(self, key_id: str) -> ApiKeyRecord:
        records = self.records()
        for r in records:
            if r.key_id == key_id:
                r.revoked_at = r.revoked_at or _now().isoformat(timespec="seconds")
                self._write(records)
                return r
        raise KeyRefused(f"no API key with id {key_id}")

    def authenticate(self, secret: str | None) -> Principal:
        """The principal of a presented key; KeyRefused says why not."""
        if not secret:
            raise KeyRefused("an API key is required (Authorization: Bearer <key>)")
        presented = _hash(secret)
        for r in self.records():
            if hmac.compare_digest(r.key_hash, presented):
                if r.revoked_at:
                    raise KeyRefused(f"API key {r.key_id} was revoked at {r.revoked_at}")
                if r.expires_at and dt.datetime.fromisoformat(r.expires_at) <= _now():
                    raise KeyRefused(f"API key {r.key_id} expired at {r.expires_at}")
                return r.principal()
        raise KeyRefused("unknown API key")
