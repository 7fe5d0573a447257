"""Browser sign-in through the OIDC provider: the authorization-code flow with PKCE (S256),
`state` and `nonce`; the callback exchanges the code, checks the ID token and hands the page a
sign-in keyed by a one-time code in its URL (the browser's own state is written by the page)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from appliance.config import ApplianceSettings
from appliance.security.oidc_tokens import (
    OidcProvider,
    ProviderUnavailable,
    TokenRefused,
    looks_like_jwt,
)
from appliance.security.secret_files import read_secret_file
from appliance.webapp.client import GatewayClient, GatewayError

CALLBACK_PATH = "/oidc/callback"
STATE_COOKIE = "appliance-oidc-state"
PENDING_TTL_S = 600.0  # time to fill in the provider's form
HANDOFF_TTL_S = 60.0  # time for the page to load after the callback
MAX_PENDING = 10_000  # sign-ins started and not finished; the oldest are forgotten


@dataclass
class _Pending:
    verifier: str
    nonce: str
    started: float


def public_url(settings: ApplianceSettings) -> str:
    """The web app's URL as browsers reach it (webapp.public_url, else its host and port)."""
    web = settings.webapp
    if web.public_url:
        return web.public_url.rstrip("/")
    return f"{'https' if web.tls else 'http'}://{web.host}:{web.port}"


def _client_secret(path: Path | None) -> str | None:
    """The client secret (None for a public client), from a file only its owner may read."""
    if path is None:
        return None
    size = path.stat().st_size if path.exists() else 0  # absent: read_secret_file says so
    return read_secret_file(path, size=size, what="OIDC client secret").decode().strip()


def _page(status: int, message: str) -> HTMLResponse:
    body = (
        f"<!doctype html><title>Sign-in</title><p>{html.escape(message)}</p>"
        '<p><a href="/">Back to the sign-in page</a></p>'
    )
    return HTMLResponse(body, status)


class OidcSignIn:
    """The sign-in routes, the sign-ins under way (by state) and those waiting for their page."""

    def __init__(self, settings: ApplianceSettings, client: GatewayClient):
        self.oidc = settings.identity.oidc
        self.provider = OidcProvider(self.oidc)
        self.client = client
        self.redirect_uri = public_url(settings) + CALLBACK_PATH
        self.secure_cookie = self.redirect_uri.startswith("https://")
        self.secret = _client_secret(self.oidc.client_secret_file)
        self._pending: dict[str, _Pending] = {}
        self._handoffs: dict[str, tuple[dict[str, Any], float]] = {}

    def close(self) -> None:
        self.provider.close()

    def take(self, handoff: str | None) -> dict[str, Any] | None:
        """The account a callback signed in, once, for the page that follows it."""
        found = self._handoffs.pop(handoff, None) if handoff else None
        if found is None or time.monotonic() - found[1] > HANDOFF_TTL_S:
            return None
        return found[0]

    def _forget_old(self) -> None:
        now = time.monotonic()
        for state in [s for s, p in self._pending.items() if now - p.started > PENDING_TTL_S]:
            del self._pending[state]
        for key in [k for k, (_, t) in self._handoffs.items() if now - t > HANDOFF_TTL_S]:
            del self._handoffs[key]
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def mount(self, app: FastAPI) -> None:
        """Add /oidc/login and /oidc/callback to the web app's server."""
        app.get("/oidc/login")(self.login)
        app.get(CALLBACK_PATH)(self.callback)

    async def login(self) -> Any:
        """Send the browser to the provider with a fresh state, nonce and PKCE challenge."""
        try:
            doc = await asyncio.to_thread(self.provider.discovery)
        except ProviderUnavailable as exc:
            return _page(503, f"The sign-in provider cannot be reached: {exc}")
        self._forget_old()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        self._pending[state] = _Pending(verifier, nonce, time.monotonic())
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        query = {
            "response_type": "code",
            "client_id": self.oidc.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.oidc.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        response = RedirectResponse(f"{doc['authorization_endpoint']}?{urlencode(query)}", 302)
        # The state is also tied to this browser: a callback carried to another browser (a
        # sign-in forced on someone, as the attacker's user) finds no cookie there.
        response.set_cookie(
            STATE_COOKIE,
            state,
            max_age=int(PENDING_TTL_S),
            path=CALLBACK_PATH,
            httponly=True,
            samesite="lax",
            secure=self.secure_cookie,
        )
        return response

    async def callback(self, request: Request) -> Any:
        """The provider's answer: code for tokens, ID token checked, then the page, signed in."""
        params = request.query_params
        if params.get("error"):
            return _page(400, f"The provider did not sign you in: {params['error']}.")
        state, code = params.get("state"), params.get("code")
        pending = self._pending.pop(state, None) if state else None
        if not code or pending is None or request.cookies.get(STATE_COOKIE) != state:
            return _page(400, "This sign-in is unknown or has expired; please start again.")
        if time.monotonic() - pending.started > PENDING_TTL_S:
            return _page(400, "This sign-in has expired; please start again.")
        try:
            tokens = await self._exchange(code, pending)
            await asyncio.to_thread(self.provider.verify, tokens["id_token"], pending.nonce)
        except TokenRefused as exc:
            return _page(400, f"The provider's answer was refused: {exc}")
        except ProviderUnavailable as exc:
            return _page(503, f"The sign-in provider cannot be reached: {exc}")
        # The gateway takes a JWT access token (re-checked at the provider); a provider whose
        # access tokens are opaque (Google) leaves the ID token, good until it expires.
        access = tokens.get("access_token")
        bearer = (
            access if isinstance(access, str) and looks_like_jwt(access) else tokens["id_token"]
        )
        try:
            account = await self.client.me(bearer)
        except GatewayError as exc:
            return _page(exc.status if exc.status < 500 else 503, f"Not signed in: {exc}")
        handoff = secrets.token_urlsafe(32)
        self._handoffs[handoff] = ({**account, "token": bearer}, time.monotonic())
        response = RedirectResponse(f"/?{urlencode({'signin': handoff})}", 303)
        response.delete_cookie(STATE_COOKIE, path=CALLBACK_PATH)
        return response

    async def _exchange(self, code: str, pending: _Pending) -> dict[str, Any]:
        doc = await asyncio.to_thread(self.provider.discovery)
        body = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": self.oidc.client_id,
            "code_verifier": pending.verifier,
        }
        auth = (self.oidc.client_id, self.secret) if self.secret else None
        verify: Any = str(self.oidc.ca_file) if self.oidc.ca_file else True
        try:
            async with httpx.AsyncClient(timeout=self.oidc.timeout_s, verify=verify) as http:
                response = await http.post(doc["token_endpoint"], data=body, auth=auth)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"its token endpoint: {exc!r}") from None
        if response.status_code >= 500:
            raise ProviderUnavailable(f"its token endpoint answered {response.status_code}")
        try:
            tokens = response.json()
        except ValueError:
            tokens = None
        if response.status_code != 200 or not isinstance(tokens, dict):
            raise TokenRefused(f"the code was not accepted ({response.text[:200]})", "code")
        if not isinstance(tokens.get("id_token"), str):
            raise TokenRefused("the provider sent no ID token (is 'openid' in scopes?)", "code")
        return tokens
