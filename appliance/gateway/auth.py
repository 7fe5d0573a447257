"""Who a request acts for: its API key's (or sign-in session's) principal, or the local
administrator while the appliance has no accounts at all (single-user mode, as the CPU demo
starts). Also signs users in with a password, with a lockout after repeated failures."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request

from appliance.config.gateway import GatewaySettings
from appliance.gateway.audit_events import audit
from appliance.gateway.protocol import RequestError
from appliance.security.api_keys import ApiKeyRecord, ApiKeyStore, KeyRefused, Principal
from appliance.security.audit import AuditLog
from appliance.security.oidc_tokens import looks_like_jwt
from appliance.security.users import MAX_USERNAME_LENGTH, SignInRefused, UserStore

LOCAL_ADMIN = Principal("local", admin=True)
KEY_USE_EVERY_S = 3600.0
log = logging.getLogger(__name__)


class AccessRefused(RequestError):
    """A refused request that the audit log counts (appliance/gateway/refusals.py) rather than
    records one by one: `actor`, `action` and `reason` are its key there."""

    def __init__(self, status: int, message: str, *, actor: str, action: str, reason: str, **kw):
        super().__init__(status, message, **kw)
        self.actor, self.action, self.reason = actor, action, reason


def key_refused(exc: KeyRefused, action: str, **kw) -> AccessRefused:
    """The 401 for a refused key, counted under `action` by the key's user (or "?")."""
    return AccessRefused(
        401,
        str(exc),
        actor=exc.user or "?",
        action=action,
        reason=exc.reason,
        type="authentication_error",
        **kw,
    )


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    except FileNotFoundError:
        return 0, 0


class Authenticator:
    """Checks API keys and passwords against the keys and accounts files; whether any account
    exists is re-read only when one of the files changes."""

    def __init__(self, keys_file: Path, users_file: Path, settings: GatewaySettings):
        self.keys = ApiKeyStore(keys_file)
        self.users = UserStore(users_file)
        self.settings = settings
        self._stamps: tuple | None = None
        self._has_accounts = False
        # Failed sign-ins per name, least recently failed first; at most sign_in_tracked_names.
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._failures_lock = threading.Lock()
        self.audit: AuditLog | None = None
        self._key_logged: dict[str, float] = {}
        self._audit_writer = ThreadPoolExecutor(1, thread_name_prefix="key-use-audit")
        # OIDC bearer tokens (appliance/gateway/oidc_bearer.py), set when `oidc` is enabled.
        self.oidc = None

    @property
    def single_user(self) -> bool:
        """No keys and no users: every request acts as the local administrator. Never while
        an OIDC provider may sign users in: the provider's users have no local account."""
        if self.oidc is not None:
            return False
        stamps = (_stamp(self.keys.path), _stamp(self.users.path))
        if stamps != self._stamps:
            self._stamps = stamps
            self._has_accounts = bool(self.keys.records() or self.users.records())
        return not self._has_accounts

    def key_record(self, authorization: str | None) -> ApiKeyRecord | None:
        """The valid key a request presents (None in single-user mode); 401 otherwise."""
        if self.single_user:
            return None
        secret = None
        if authorization and authorization.lower().startswith("bearer "):
            secret = authorization[7:].strip()
        try:
            record = self.keys.check(secret)
        except KeyRefused as exc:
            raise key_refused(exc, "key_refused", code="invalid_api_key") from None
        self._log_key_use(record)
        return record

    def _log_key_use(self, record: ApiKeyRecord) -> None:
        """Key use goes into the audit log once an hour per key (every request would drown
        the log; the requests themselves are in the request records), written by a thread of
        its own: the entry is fsynced, and the request checking its key may be on the event
        loop."""
        now = time.monotonic()
        if self.audit is None or now - self._key_logged.get(record.key_id, -KEY_USE_EVERY_S) < (
            KEY_USE_EVERY_S
        ):
            return
        self._key_logged[record.key_id] = now
        self._audit_writer.submit(self._append_key_use, self.audit, record)

    @staticmethod
    def _append_key_use(audit: AuditLog, record: ApiKeyRecord) -> None:
        try:
            audit.append(record.user, "key_use", record.key_id, kind=record.kind)
        except Exception:  # a full disk must not refuse every request
            log.exception("could not record the use of key %s", record.key_id)

    def principal(self, authorization: str | None) -> Principal:
        record = self.key_record(authorization)
        return LOCAL_ADMIN if record is None else record.principal()

    def sign_in(self, username: str, password: str) -> tuple[str, ApiKeyRecord]:
        """A new session key for a user's password; 401 if wrong, 429 while locked out."""
        if len(username) > MAX_USERNAME_LENGTH:
            # No account can have this name; refused before any state is kept for it.
            raise AccessRefused(
                400,
                f"a username has at most {MAX_USERNAME_LENGTH} characters",
                actor="?",
                action="sign_in_refused",
                reason="name too long",
                param="username",
            )
        now = time.monotonic()
        window = self.settings.sign_in_lockout_s
        with self._failures_lock:
            recent = [t for t in self._failures.get(username, []) if now - t < window]
        if len(recent) >= self.settings.sign_in_max_failures:
            wait = int(window - (now - recent[0])) + 1
            raise AccessRefused(
                429,
                f"too many failed sign-ins for this name; try again in {wait} s",
                actor=username,
                action="sign_in_refused",
                reason="locked out",
                type="rate_limit_error",
                code="sign_in_locked",
                headers={"retry-after": str(wait)},
            )
        try:
            user = self.users.verify(username, password)
        except SignInRefused as exc:
            self._failed(username, now)
            raise RequestError(
                401, str(exc), type="authentication_error", code="sign_in_refused"
            ) from None
        with self._failures_lock:
            self._failures.pop(username, None)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.settings.session_ttl_s)
        return self.keys.create(
            user.username, user.role, user.groups, expires_at=expires, kind="session"
        )

    def _failed(self, username: str, now: float) -> None:
        """Remember a name's failure, forgetting the least recently failed names beyond the
        bound (names are chosen by whoever signs in: without one, memory grows for good)."""
        window = self.settings.sign_in_lockout_s
        with self._failures_lock:  # sign-ins are checked on worker threads
            failures = [t for t in self._failures.pop(username, []) if now - t < window]
            self._failures[username] = [*failures, now]
            while len(self._failures) > self.settings.sign_in_tracked_names:
                self._failures.popitem(last=False)


def principal(request: Request) -> Principal:
    """The request's principal (401 without a valid key), checked once per request and kept on
    it, so that a refusal later in the request can name who was refused."""
    who = getattr(request.state, "principal", None)
    if who is None:
        who = request.app.state.gateway.auth.principal(request.headers.get("authorization"))
        request.state.principal = who
    return who


def admin(request: Request) -> Principal:
    """An administrator's principal (403 for other users)."""
    who = principal(request)
    if not who.admin:
        raise AccessRefused(
            403,
            f"user {who.user} is not an administrator",
            actor=who.user,
            action="admin_refused",
            reason="not an administrator",
            type="permission_error",
        )
    return who


async def _oidc_principal(request: Request) -> None:
    """An OIDC bearer token's principal, kept on the request for principal() (its check may
    ask the provider: awaited here, where the other checks are synchronous)."""
    oidc = request.app.state.gateway.auth.oidc
    if oidc is None or getattr(request.state, "principal", None) is not None:
        return
    token = oidc_token(request.headers.get("authorization"))
    if token:
        who, first_use = await oidc.principal(token)
        request.state.principal = who
        if first_use:  # once per token, as a password sign-in is recorded once per session
            role = "admin" if who.admin else "user"
            groups = sorted(who.groups)
            await audit(
                request, who.user, "sign_in", "oidc", key_id=who.key_id, role=role, groups=groups
            )


def oidc_token(authorization: str | None) -> str | None:
    """The bearer token if it is a JWT (an OIDC provider's token, not an appliance key)."""
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
        if looks_like_jwt(token):
            return token
    return None


# FastAPI dependencies. Coroutines on purpose: FastAPI runs a plain function dependency in a
# worker thread, a round trip through the thread pool and the GIL on every request.
async def authenticated(request: Request) -> Principal:
    """FastAPI dependency: principal()."""
    await _oidc_principal(request)
    return principal(request)


async def administrator(request: Request) -> Principal:
    """FastAPI dependency: admin()."""
    await _oidc_principal(request)
    return admin(request)
