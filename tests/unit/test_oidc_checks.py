"""The parts of OIDC sign-in that need no provider: which bearer keys are tokens, algorithms
refused before any key is looked up, claims read as a username and groups, the web app's
redirect URI and its one-time hand-over of a sign-in."""

from __future__ import annotations

import jwt
import pytest
from appliance.security.oidc_tokens import OidcProvider, TokenRefused, looks_like_jwt

from appliance.config import load_settings
from appliance.config.identity import IdentitySettings, OidcSettings
from appliance.gateway.oidc_bearer import OidcBearer
from appliance.webapp import oidc_sign_in
from appliance.webapp.oidc_sign_in import OidcSignIn, public_url

OIDC = {"issuer": "https://sso.example.org", "client_id": "appliance"}


def test_tokens_are_told_from_appliance_keys():
    assert looks_like_jwt(jwt.encode({"sub": "a"}, "k" * 32, algorithm="HS256"))
    assert not looks_like_jwt("ak-1a2b3c4d-secret")
    assert not looks_like_jwt("eyJ.only-two")


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_symmetric_and_unsigned_tokens_are_refused_before_any_key_is_read(alg):
    provider = OidcProvider(OidcSettings(**OIDC))
    key = None if alg == "none" else "k" * 64
    token = jwt.encode({"sub": "a", "iss": OIDC["issuer"]}, key, algorithm=alg)
    with pytest.raises(TokenRefused, match="are not accepted"):
        provider.verify(token)
    with pytest.raises(TokenRefused, match="well-formed"):
        provider.verify("eyJub3QganNvbg.x.y")
    provider.close()


def test_claims_give_the_username_and_groups():
    identity = IdentitySettings(sources=["oidc"], oidc=OidcSettings(**OIDC))
    bearer = OidcBearer(identity)
    assert bearer._username({"preferred_username": "ann"}) == "ann"
    assert bearer._groups({"groups": "eng"}) == ["eng"]
    assert bearer._groups({}) == []
    for claims in ({}, {"preferred_username": ""}, {"preferred_username": "x" * 500}):
        with pytest.raises(TokenRefused, match="not a username"):
            bearer._username(claims)
    with pytest.raises(TokenRefused, match="not a list"):
        bearer._groups({"groups": [1, 2]})
    bearer.close()


def test_the_redirect_uri_and_a_one_time_hand_over():
    settings = load_settings(
        identity={"sources": ["local", "oidc"], "oidc": OIDC},
        webapp={"port": 7001, "public_url": "https://ai.example.org/"},
    )
    assert public_url(settings) == "https://ai.example.org"
    default = load_settings(webapp={"port": 7001})
    assert public_url(default) == "http://127.0.0.1:7001"
    sign_in = OidcSignIn(settings, client=None)
    assert sign_in.redirect_uri == "https://ai.example.org/oidc/callback"
    sign_in._handoffs["code"] = ({"user": "ann"}, oidc_sign_in.time.monotonic())
    assert sign_in.take("code") == {"user": "ann"}
    assert sign_in.take("code") is None and sign_in.take(None) is None
    sign_in._handoffs["old"] = ({"user": "ann"}, oidc_sign_in.time.monotonic() - 3600)
    assert sign_in.take("old") is None
    sign_in.close()
