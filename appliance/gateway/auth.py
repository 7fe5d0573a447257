"""Who a request acts for: its API key's principal, or the local administrator while the
appliance has no keys at all (single-user mode, as the CPU demo starts)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import Request

from appliance.gateway.protocol import RequestError
from security.api_keys import ApiKeyStore, KeyRefused, Principal

LOCAL_ADMIN = Principal("local", admin=True)


class Authenticator:
    """Checks API keys against the keys file, re-read only when the file changes."""

    def __init__(self, path: Path):
        self.store = ApiKeyStore(path)
        self._stamp: tuple[int, int] | None = None
        self._has_keys = False

    def _refresh(self) -> None:
        try:
            st = os.stat(self.store.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._stamp = stamp
            self._has_keys = bool(stamp[1]) and bool(self.store.records())

    def principal(self, authorization: str | None) -> Principal:
        self._refresh()
        if not self._has_keys:
            return LOCAL_ADMIN
        secret = None
        if authorization and authorization.lower().startswith("bearer "):
            secret = authorization[7:].strip()
        try:
            return self.store.authenticate(secret)
        except KeyRefused as exc:
            raise RequestError(
                401, str(exc), type="authentication_error", code="invalid_api_key"
            ) from None


def principal(request: Request) -> Principal:
    """FastAPI dependency: the request's principal (401 without a valid key)."""
    return request.app.state.gateway.auth.principal(request.headers.get("authorization"))


def admin(request: Request) -> Principal:
    """FastAPI dependency: an administrator's principal (403 for other users)."""
    who = principal(request)
    if not who.admin:
        raise RequestError(403, f"user {who.user} is not an administrator", type="permission_error")
    return who
