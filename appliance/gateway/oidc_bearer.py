"""Requests that present an OIDC provider's token as their bearer key: the token is verified
against the provider's keys, checked again at its userinfo endpoint every `recheck_s`, and its
groups mapped onto the appliance's role and groups. Results are kept per token (by hash)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from appliance.config.identity import IdentitySettings
from appliance.gateway.auth import AccessRefused
from appliance.gateway.protocol import RequestError
from appliance.security.api_keys import Principal
from appliance.security.group_mapping import GroupMapping, NotAllowed
from appliance.security.oidc_tokens import OidcProvider, ProviderUnavailable, TokenRefused
from appliance.security.users import MAX_USERNAME_LENGTH

# Tokens remembered at once; the least recently used go first (each entry is small).
MAX_CACHED_TOKENS = 10_000


@dataclass
class _Checked:
    principal: Principal
    expires: float  # the token's exp (epoch seconds)
    checked: float  # monotonic time of the last check at the provider


class OidcBearer:
    """Principals for OIDC bearer tokens; refusals as the gateway's 401, 403 and 503."""

    def __init__(self, identity: IdentitySettings):
        self.settings = identity.oidc
        self.provider = OidcProvider(identity.oidc)
        self.mapping = GroupMapping(identity.mapping)
        self._cache: OrderedDict[str, _Checked] = OrderedDict()
        # Tokens refused lately, with when to look again: a client retrying a revoked token
        # must not turn each retry into a call to the provider.
        self._refused: OrderedDict[str, tuple[TokenRefused | NotAllowed, float]] = OrderedDict()

    def close(self) -> None:
        self.provider.close()

    async def principal(self, token: str) -> tuple[Principal, bool]:
        """The token's principal, from the cache while its last check is recent enough, and
        whether the token is new here (its first use: a sign-in, for the audit log)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self._cache.get(digest)
        now = time.monotonic()
        if entry is not None and entry.expires > time.time() - self.settings.leeway_s:
            recheck = self.settings.recheck_s
            if recheck == 0 or now - entry.checked < recheck:
                self._cache.move_to_end(digest)
                return entry.principal, False
        refused = self._refused.get(digest)
        if refused is not None and now < refused[1]:
            raise self._refusal(refused[0])
        self._cache.pop(digest, None)
        self._refused.pop(digest, None)
        try:
            checked = await asyncio.to_thread(self._check, token, digest)
        except (TokenRefused, NotAllowed) as exc:
            self._refused[digest] = (exc, now + max(self.settings.recheck_s, 1.0))
            while len(self._refused) > MAX_CACHED_TOKENS:
                self._refused.popitem(last=False)
            raise self._refusal(exc) from None
        except ProviderUnavailable as exc:
            raise RequestError(503, str(exc), type="service_unavailable") from None
        self._cache[digest] = checked
        while len(self._cache) > MAX_CACHED_TOKENS:
            self._cache.popitem(last=False)
        return checked.principal, entry is None

    @staticmethod
    def _refusal(exc: TokenRefused | NotAllowed) -> AccessRefused:
        if isinstance(exc, TokenRefused):
            return AccessRefused(
                401,
                str(exc),
                actor="?",
                action="oidc_token_refused",
                reason=exc.reason,
                type="authentication_error",
                code="invalid_token",
            )
        return AccessRefused(
            403,
            str(exc),
            actor="?",
            action="oidc_token_refused",
            reason="not in an allowed group",
            type="permission_error",
        )

    def _check(self, token: str, digest: str) -> _Checked:
        claims = self.provider.verify(token)
        checked = time.monotonic()
        if self.settings.recheck_s > 0:
            # The provider's current view wins: groups changed there count from this check on.
            userinfo = self.provider.userinfo(token)
            if userinfo.get("sub") != claims["sub"]:
                raise TokenRefused("the provider names another user for this token", "subject")
            claims = {**claims, **userinfo}
        username = self._username(claims)
        mapped = self.mapping.map(username, self._groups(claims))
        principal = Principal(
            mapped.username, frozenset(mapped.groups), mapped.role == "admin", f"oidc-{digest[:8]}"
        )
        return _Checked(principal, float(claims["exp"]), checked)

    def _username(self, claims: dict[str, Any]) -> str:
        name = claims.get(self.settings.username_claim)
        if not isinstance(name, str) or not name or len(name) > MAX_USERNAME_LENGTH:
            raise TokenRefused(
                f"the token's {self.settings.username_claim!r} claim is not a username", "username"
            )
        return name

    def _groups(self, claims: dict[str, Any]) -> list[str]:
        groups = claims.get(self.settings.groups_claim, [])
        if isinstance(groups, str):  # some providers send a single group as a string
            groups = [groups]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenRefused(
                f"the token's {self.settings.groups_claim!r} claim is not a list", "groups"
            )
        return groups
