"""User accounts for signing in with a password: scrypt hashes, roles and groups, in a 0600 file."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.security.api_keys import Principal, Role
from appliance.security.secret_files import replace_secret_file

from appliance.errors import ApplianceError

MAX_USERNAME_LENGTH = 32
USERNAME = re.compile(rf"^[a-z_][a-z0-9_.-]{{0,{MAX_USERNAME_LENGTH - 1}}}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
# scrypt at n=2**14, r=8 takes ~50 ms and 16 MiB here: slow for guessing, fine for signing in.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UserError(ApplianceError):
    """A user account cannot be created or changed as asked (name taken, weak password ...)."""


class SignInRefused(ApplianceError):
    """Wrong username or password (which of the two is not said), or a disabled account."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    n, r, p = _SCRYPT["n"], _SCRYPT["r"], _SCRYPT["p"]
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${n}${r}${p}${salt_b64}${digest_b64}"


def _password_matches(password: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    expected = base64.b64decode(digest)
    actual = hashlib.scrypt(
        password.encode()[: MAX_PASSWORD_LENGTH * 4],
        salt=base64.b64decode(salt),
        dklen=len(expected),
        n=int(n),
        r=int(r),
        p=int(p),
    )
    return hmac.compare_digest(actual, expected)


# Compared against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password(secrets.token_hex(16))


@dataclass
class UserRecord:
    """One account as stored: the password's scrypt hash, never the password."""

    username: str
    password_hash: str
    role: Role = "user"
    groups: list[str] = field(default_factory=list)
    created_at: str = ""
    disabled: bool = False

    def principal(self) -> Principal:
        return Principal(self.username, frozenset(self.groups), self.role == "admin")


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"a password may have at most {MAX_PASSWORD_LENGTH} characters")


class UserStore:
    """The accounts file (JSON, mode 0600), rewritten atomically on every change."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[UserRecord]:
        if not self.path.exists():
            return []
        return [UserRecord(**r) for r in json.loads(self.path.read_text())["users"]]

    def get(self, username: str) -> UserRecord | None:
        return next((u for u in self.records() if u.username == username), None)

    def _write(self, records: list[UserRecord]) -> None:
        data = json.dumps({"users": [asdict(r) for r in records]}, indent=1)
        replace_secret_file(self.path, data.encode())

    def add(
        self, username: str, password: str, role: Role = "user", groups: list[str] | None = None
    ) -> UserRecord:
        if not USERNAME.fullmatch(username):
            raise UserError(
                f"invalid username {username!r}: lowercase letters, digits, '_', '.', '-', "
                f"starting with a letter or '_', at most {MAX_USERNAME_LENGTH} characters"
            )
        check_password(password)
        records = self.records()
        if any(u.username == username for u in records):
            raise UserError(f"user {username} already exists")
        record = UserRecord(
            username,
            hash_password(password),
            role,
            sorted(groups or []),
            dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        self._write([*records, record])
        return record

    def _change(self, username: str, change) -> UserRecord:
        records = self.records()
        for r in records:
            if r.username == username:
                change(r)
                self._write(records)
                return r
        raise UserError(f"no user {username}")

    def set_password(self, username: str, password: str) -> UserRecord:
        check_password(password)
        return self._change(
            username, lambda r: setattr(r, "password_hash", hash_password(password))
        )

    def set_disabled(self, username: str, disabled: bool) -> UserRecord:
        return self._change(username, lambda r: setattr(r, "disabled", disabled))

    def remove(self, username: str) -> None:
        records = self.records()
        kept = [r for r in records if r.username != username]
        if len(kept) == len(records):
            raise UserError(f"no user {username}")
        self._write(kept)

    def verify(self, username: str, password: str) -> UserRecord:
        """The account `username` if `password` is its password; SignInRefused otherwise."""
        record = self.get(username)
        matches = _password_matches(password, record.password_hash if record else _DUMMY_HASH)
        if record is None or not matches:
            raise SignInRefused("wrong username or password")
        if record.disabled:
            raise SignInRefused(f"the account {username} is disabled")
        return record
