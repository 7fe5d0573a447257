"""A real OIDC provider for the tests (oidc-provider-mock, served on a thread), issuing JWT
access tokens as Keycloak and Entra do, and a client that signs a user in through its
authorization form with PKCE, as a browser would."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import flask
import httpx
import jwt
import oidc_provider_mock
import werkzeug.serving

CLIENT_ID = "appliance"
REDIRECT_URI = "http://localhost/oidc/callback"


@dataclass
class Provider:
    """A running provider: its issuer URL, and the lifetime of the access tokens it issues next."""

    issuer: str
    server: werkzeug.serving.BaseWSGIServer
    access_token_ttl_s: int = 3600
    thread: threading.Thread | None = field(default=None, repr=False)
    signing_key: Any = field(default=None, repr=False)  # known once it issued a token

    def sign(self, claims: dict[str, Any]) -> str:
        """A JWT signed with the provider's own key, for tokens it would not issue itself."""
        pem = self.signing_key.as_pem(is_private=True)
        kid = self.signing_key.thumbprint()
        return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": kid})

    def stop(self) -> None:
        """Stop serving (the 'provider down' case); idempotent."""
        if self.thread is not None and self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(10)
            self.server.server_close()
            assert not self.thread.is_alive(), "the OIDC provider did not stop"

    def set_user(self, sub: str, claims: dict[str, Any]) -> None:
        resp = httpx.put(f"{self.issuer}/users/{sub}", json=claims, timeout=10)
        assert resp.status_code == 204, resp.text

    def revoke(self, sub: str) -> None:
        """The provider's way of disabling a user: all the user's tokens are revoked."""
        resp = httpx.post(f"{self.issuer}/users/{sub}/revoke-tokens", timeout=10)
        assert resp.status_code == 204, resp.text

    def tokens(self, sub: str, scope: str = "openid profile email") -> dict[str, Any]:
        """Sign `sub` in with the authorization-code flow and PKCE: the token response."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        query = {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": "s",
            "nonce": "n",
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        with httpx.Client(timeout=10) as http:
            resp = http.post(f"{self.issuer}/oauth2/authorize", params=query, data={"sub": sub})
            assert resp.status_code == 302, resp.text
            code = parse_qs(urlsplit(resp.headers["location"]).query)["code"][0]
            body = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "client_id": CLIENT_ID,
                "code_verifier": verifier,
            }
            resp = http.post(f"{self.issuer}/oauth2/token", data=body, auth=(CLIENT_ID, "s"))
            assert resp.status_code == 200, resp.text
            return resp.json()


def _jwt_access_token(provider: Provider):
    """authlib's access-token generator: a JWT signed with the provider's own key."""

    def generate(client, grant_type, user, scope) -> str:
        provider.signing_key = flask.g.oidc_provider_mock_storage.jwk
        now = int(time.time())
        claims = {
            "iss": flask.request.host_url.rstrip("/"),
            "sub": user.sub,
            "aud": client.id,
            "azp": client.id,
            "iat": now,
            "exp": now + provider.access_token_ttl_s,
            "scope": scope,
            "jti": secrets.token_hex(8),
            **{k: v for k, v in user.claims.items() if k not in ("iss", "aud", "exp")},
        }
        return provider.sign(claims)

    return generate


@contextlib.contextmanager
def running_provider(port: int = 0, id_token_ttl_s: int = 3600) -> Iterator[Provider]:
    """A provider on `port` (0: a free one) of localhost, with a signing key of its own, whose
    ID tokens live `id_token_ttl_s`, stopped on exit even if the test failed."""
    app = flask.Flask("oidc_provider_mock")  # its templates are found from this name
    server = werkzeug.serving.make_server("localhost", port, app, threaded=True)
    provider = Provider(f"http://localhost:{server.server_port}", server)
    app.config["OAUTH2_ACCESS_TOKEN_GENERATOR"] = _jwt_access_token(provider)
    # The mock gives ID tokens (and its record of access tokens) this lifetime; the access
    # tokens' own exp is access_token_ttl_s.
    oidc_provider_mock.init_app(app, access_token_max_age=dt.timedelta(seconds=id_token_ttl_s))
    app.secret_key = secrets.token_bytes(16)
    provider.thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    provider.thread.start()
    try:
        yield provider
    finally:
        provider.stop()
