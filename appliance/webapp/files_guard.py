"""The web app's own file endpoints (Gradio's /gradio_api/upload and /gradio_api/file=) for
signed-in users only. The page keeps its sign-in in a cookie, sealed with the web app's secret
(so the cookie is worth nothing elsewhere, and the gateway token never reaches the page's
scripts); each such request is checked with the gateway, which may have ended the session."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Awaitable, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from appliance.webapp.client import GatewayClient, GatewayError

COOKIE = "appliance-files"
# Uploads (and their progress) and downloads of uploaded or cached files, under both of
# Gradio's spellings of the download route.
GUARDED_PREFIXES = ("/gradio_api/upload", "/gradio_api/file=", "/gradio_api/file/")
_NONCE_BYTES = 12
# Set (or, with an empty ticket, removed) by the page after every change of sign-in.
SET_COOKIE_JS = f"""
(ticket) => {{
  const secure = location.protocol === "https:" ? "; Secure" : "";
  const life = ticket ? "" : "; Max-Age=0";
  document.cookie = "{COOKIE}=" + (ticket || "") + "; Path=/; SameSite=Strict" + secure + life;
  return [];
}}
"""


def guarded(path: str) -> bool:
    """Whether `path` is one of the file endpoints (repeated slashes route the same way)."""
    return re.sub("/{2,}", "/", path).startswith(GUARDED_PREFIXES)


def _cipher(secret: str) -> AESGCM:
    return AESGCM(hashlib.sha256(b"appliance-webapp-files|" + secret.encode()).digest())


def seal(secret: str, token: str) -> str:
    """The cookie value that stands for the gateway `token` (empty in single-user mode)."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = nonce + _cipher(secret).encrypt(nonce, token.encode(), None)
    return base64.urlsafe_b64encode(sealed).decode().rstrip("=")


def unseal(secret: str, ticket: str) -> str | None:
    """The token a cookie value stands for; None for anything this web app did not seal."""
    try:
        raw = base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))
        token = _cipher(secret).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], None)
        return token.decode()
    except (ValueError, binascii.Error, InvalidTag):
        return None


def ticket(secret: str, session: dict | None) -> str:
    """What the page keeps for `session`: a sealed token, or "" when nobody is signed in."""
    if not (session and session.get("user")):
        return ""
    return seal(secret, session.get("token") or "")


def _refusal(status: int, message: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "service_unavailable"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def guard_files(app: FastAPI, client: GatewayClient, secret: str) -> None:
    """Refuse the file endpoints of `app` unless the request's cookie is a sign-in the gateway
    accepts (anyone, in single-user mode, as the gateway then accepts everyone)."""

    @app.middleware("http")
    async def signed_in_files(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not guarded(request.url.path):
            return await call_next(request)
        token = unseal(secret, request.cookies.get(COOKIE, ""))
        try:
            account = await client.me(token or None)
        except GatewayError as exc:
            if exc.status in (401, 403):
                return _refusal(401, "sign in to the web app to upload or download files")
            return _refusal(503, f"the gateway cannot check the sign-in: {exc}")
        if not token and not account.get("single_user"):
            return _refusal(401, "sign in to the web app to upload or download files")
        return await call_next(request)
