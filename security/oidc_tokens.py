"""OIDC tokens checked against the provider: its discovery document, its signing keys (JWKS),
and its userinfo endpoint. Blocking calls (network, signature checks): run them in a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import jwt

from appliance.config.identity import OidcSettings
from appliance.errors import ApplianceError

# Asymmetric algorithms only: `none` and the HMAC ones (a key anyone with the client secret
# holds, or none at all) are never accepted, whatever a token's header says.
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# An unknown `kid` re-reads the keys (the provider rotated them), at most this often: a flood
# of tokens with made-up key ids must not turn into a flood of requests to the provider.
KEYS_REFRESH_MIN_S = 10.0
DISCOVERY_TTL_S = 3600.0


class TokenRefused(ApplianceError):
    """A token that is not (or no longer) good: forged, expired, for another client, revoked."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # short and fixed, for the audit log's counts of refusals


class ProviderUnavailable(ApplianceError):
    """The provider could not be asked (down, timing out, answering nonsense)."""


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts, the first a JSON object: a JWT rather than an appliance key."""
    return token.startswith("eyJ") and token.count(".") == 2


def _get_json(http: httpx.Client, url: str, what: str, token: str | None = None) -> dict[str, Any]:
    """A JSON object from the provider; with `token` (the userinfo call) a refusal of the
    request is one of the token: TokenRefused rather than ProviderUnavailable."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        message = f"the OIDC provider cannot be reached for {what}: {exc!r}"
        raise ProviderUnavailable(message) from None
    status = response.status_code
    # 401 is RFC 6750's answer for a revoked token; some providers (authlib's) answer 400
    # `access_denied`. Any 4xx but 429 (slow down) refuses the token.
    if token and 400 <= status < 500 and status != 429:
        raise TokenRefused(
            "the provider's userinfo endpoint does not accept this token (revoked, its user"
            " disabled, or not an access token)",
            "revoked",
        )
    if status != 200:
        raise ProviderUnavailable(f"the OIDC provider answered {status} for {what}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProviderUnavailable(f"the OIDC provider's {what} is not a JSON object")
    return body


class OidcProvider:
    """One provider's discovery document and keys, cached; verifies its tokens. Thread-safe."""

    def __init__(self, settings: OidcSettings):
        self.settings = settings
        self.issuer = settings.issuer.rstrip("/")
        verify: Any = str(settings.ca_file) if settings.ca_file else True
        self.http = httpx.Client(timeout=settings.timeout_s, verify=verify)
        self._lock = threading.Lock()
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0
        # kid: (the key, the algorithm the provider declares for it, if it does)
        self._keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        self._keys_read_at = -KEYS_REFRESH_MIN_S

    def close(self) -> None:
        self.http.close()

    def discovery(self) -> dict[str, Any]:
        """The provider's `/.well-known/openid-configuration`, re-read every hour."""
        with self._lock:
            if self._discovery and time.monotonic() - self._discovered_at < DISCOVERY_TTL_S:
                return self._discovery
        url = f"{self.issuer}/.well-known/openid-configuration"
        doc = _get_json(self.http, url, "its discovery document")
        if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
            # OIDC Discovery 4.3: a document naming another issuer must not be used.
            raise ProviderUnavailable(f"the discovery document at {url} names another issuer")
        for field in ("jwks_uri", "authorization_endpoint", "token_endpoint"):
            if not isinstance(doc.get(field), str):
                raise ProviderUnavailable(f"the discovery document at {url} has no {field}")
        with self._lock:
            self._discovery, self._discovered_at = doc, time.monotonic()
        return doc

    def _key(self, kid: str | None) -> tuple[jwt.PyJWK, str | None]:
        with self._lock:
            key = self._find(kid)
            due = time.monotonic() - self._keys_read_at >= KEYS_REFRESH_MIN_S
        if key is not None:
            return key
        if due:
            self._read_keys()
            with self._lock:
                key = self._find(kid)
        if key is None:
            raise TokenRefused("the token is signed with a key the provider does not have", "kid")
        return key

    def _find(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        if kid is None:  # allowed only while the provider has a single key
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _read_keys(self) -> None:
        body = _get_json(self.http, self.discovery()["jwks_uri"], "its keys")
        keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        for i, data in enumerate(body.get("keys") or []):
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue  # a key type this library does not know: tokens signed with it fail
            keys[str(data.get("kid", f"#{i}"))] = (key, data.get("alg"))
        with self._lock:
            self._keys, self._keys_read_at = keys, time.monotonic()

    def verify(self, token: str, nonce: str | None = None) -> dict[str, Any]:
        """The claims of a token signed by the provider's key, issued by it, meant for this
        client (`aud` or `azp`), and current; TokenRefused otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("the bearer token is not a well-formed JWT", "malformed") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRefused(f"tokens signed with {alg!r} are not accepted", "algorithm")
        key, declared = self._key(header.get("kid"))
        if declared is not None and declared != alg:
            raise TokenRefused("the token's algorithm is not its key's", "algorithm")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=self.issuer,
                leeway=self.settings.leeway_s,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("the token has expired", "expired") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("the token is from another issuer", "issuer") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"the token is not valid: {exc}", "invalid") from None
        self._check_audience(claims)
        if nonce is not None and claims.get("nonce") != nonce:
            raise TokenRefused("the ID token's nonce is not this sign-in's", "nonce")
        return claims

    def _check_audience(self, claims: dict[str, Any]) -> None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        client = self.settings.client_id
        # An access token for an API may name only the API as audience; `azp` is then the
        # client it was issued to (Keycloak does this).
        if client not in audiences and claims.get("azp") != client:
            raise TokenRefused("the token is meant for another client", "audience")

    def userinfo(self, token: str) -> dict[str, Any]:
        """The provider's current claims for the user the token was issued to; TokenRefused if
        it no longer accepts the token (user disabled, tokens revoked)."""
        url = self.discovery().get("userinfo_endpoint")
        if not isinstance(url, str):
            raise ProviderUnavailable("the provider has no userinfo endpoint; set recheck_s: 0")
        return _get_json(self.http, url, "userinfo", token)
