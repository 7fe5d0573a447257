"""OIDC bearer tokens at a real gateway, from a real provider (oidc-provider-mock) started here:
groups mapped to admin and user, a group granting a shared knowledge base, expired and forged
tokens refused, a revoked user refused at the next check, the provider down answered 503; and
ID tokens as bearers with no re-check (Google, Entra ID), good until they expire."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from appliance.security.audit import AuditLog
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance_dev.stack import running_gateway
from tests.oidc_provider import CLIENT_ID, Provider, running_provider
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm]
RECHECK_S = 1.0
LEEWAY_S = 1
# Long enough for a few calls on a busy machine, short enough to wait for.
ID_TOKEN_TTL_S = 10
USERS = {  # at the provider: name -> groups
    "alice": ["it-admins"],
    "bob": ["engineering"],
    "carol": ["sales"],
    "mallory": ["contractors"],
}
AUDIT_DIRS = {}  # gateway URL: its audit log's folder


def _with_users(provider: Provider) -> Provider:
    for name, groups in USERS.items():
        provider.set_user(name, {"preferred_username": name, "groups": groups})
    return provider


@contextlib.contextmanager
def _gateway(slurm_cluster, tiny_model_dir, tmp, provider: Provider, recheck_s: float):
    """A gateway taking the provider's tokens, with the groups mapping of these tests."""
    identity = {
        "sources": ["local", "oidc"],
        "oidc": {
            "issuer": provider.issuer,
            "client_id": CLIENT_ID,
            "recheck_s": recheck_s,
            "leeway_s": LEEWAY_S,
        },
        "mapping": {
            "admin_groups": ["it-admins"],
            "groups": {"engineering": ["eng"]},
            "allowed_groups": ["it-admins", "engineering", "sales"],
        },
    }
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir), identity=identity)
    with running_gateway(settings) as url:
        AUDIT_DIRS[url] = settings.audit_dir
        yield url


@pytest.fixture(scope="module")
def provider():
    with running_provider() as provider:
        yield _with_users(provider)


@pytest.fixture(scope="module")
def gateway(slurm_cluster, tiny_model_dir, tmp_path_factory, provider):
    tmp = tmp_path_factory.mktemp("oidc")
    with _gateway(slurm_cluster, tiny_model_dir, tmp, provider, RECHECK_S) as url:
        yield url


@pytest.fixture(scope="module")
def id_token_gateway(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """Google's and Entra ID's set-up (docs/oidc.md): ID tokens as bearers, `recheck_s: 0`
    (their userinfo endpoints take no ID token); a provider of its own, whose ID tokens expire
    soon. Yields (gateway URL, provider)."""
    tmp = tmp_path_factory.mktemp("oidc-id-tokens")
    with (
        running_provider(id_token_ttl_s=ID_TOKEN_TTL_S) as provider,
        _gateway(slurm_cluster, tiny_model_dir, tmp, _with_users(provider), 0) as url,
    ):
        yield url, provider


def call(url: str, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url + path, headers=headers, timeout=300, **kw)


def refused(resp: httpx.Response, status: int, words: str) -> bool:
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"], resp.text
    return True


def test_no_single_user_mode_with_oidc_and_no_accounts(gateway):
    assert call(gateway, "GET", "/v1/me").status_code == 401


def test_groups_map_to_admin_and_user(gateway, provider):
    alice = provider.tokens("alice")["access_token"]
    me = call(gateway, "GET", "/v1/me", alice).json()
    assert me == {**me, "user": "alice", "role": "admin", "kind": "oidc", "single_user": False}
    bob = provider.tokens("bob")
    me = call(gateway, "GET", "/v1/me", bob["access_token"]).json()
    assert me == {**me, "user": "bob", "role": "user", "groups": ["eng"]}
    # An ID token is signed as well, but the provider's userinfo endpoint (the re-check that
    # notices a disabled user) takes access tokens only.
    refused(call(gateway, "GET", "/v1/me", bob["id_token"]), 401, "does not accept")
    assert call(gateway, "GET", "/admin/instances", alice).status_code == 200
    refused(call(gateway, "GET", "/admin/instances", bob["access_token"]), 403, "not an admin")
    mallory = provider.tokens("mallory")["access_token"]
    refused(call(gateway, "GET", "/v1/me", mallory), 403, "none of the groups allowed")
    # A token's first use is a sign-in in the audit log; later uses are not.
    assert call(gateway, "GET", "/v1/me", alice).status_code == 200
    entries = AuditLog(AUDIT_DIRS[gateway]).entries()
    signed_in = [e for e in entries if e["action"] == "sign_in" and e["actor"] == "alice"]
    assert len(signed_in) == 1 and signed_in[0]["target"] == "oidc", signed_in


def test_a_group_grants_a_shared_knowledge_base(gateway, provider):
    alice = provider.tokens("alice")["access_token"]
    bob = provider.tokens("bob")["access_token"]
    carol = provider.tokens("carol")["access_token"]
    assert call(gateway, "POST", "/v1/knowledge_bases", alice, json={"name": "handbook"}).is_success
    files = [
        ("files", ("leave.md", b"# Leave\n\nEngineers take leave in August.\n", "text/markdown"))
    ]
    resp = call(gateway, "POST", "/v1/knowledge_bases/handbook/documents", alice, files=files)
    assert resp.status_code == 200, resp.text
    share = {"groups": ["eng"]}
    assert call(gateway, "POST", "/v1/knowledge_bases/handbook/share", alice, json=share).is_success
    docs = call(gateway, "GET", "/v1/knowledge_bases/handbook/documents", bob)
    assert [d["filename"] for d in docs.json()["data"]] == ["leave.md"]
    query = {"query": "When do engineers take leave?"}
    hits = call(gateway, "POST", "/v1/knowledge_bases/handbook/query", bob, json=query).json()
    assert "August" in hits["data"][0]["text"]
    listed = call(gateway, "GET", "/v1/knowledge_bases", carol).json()["data"]
    assert "handbook" not in [kb["name"] for kb in listed]
    resp = call(gateway, "POST", "/v1/knowledge_bases/handbook/query", carol, json=query)
    assert resp.status_code == 404


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_expired_and_forged_tokens_are_refused(gateway, provider):
    provider.access_token_ttl_s = -60
    try:
        expired = provider.tokens("alice")["access_token"]
    finally:
        provider.access_token_ttl_s = 3600
    refused(call(gateway, "GET", "/v1/me", expired), 401, "expired")

    good = provider.tokens("alice")["access_token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    kid = jwt.get_unverified_header(good)["kid"]
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": kid})
    refused(call(gateway, "GET", "/v1/me", forged), 401, "not valid")
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    refused(call(gateway, "GET", "/v1/me", unsigned), 401, "'none' are not accepted")
    hmac = jwt.encode(
        claims,
        "the client secret, which anyone with the app has",
        algorithm="HS256",
        headers={"kid": kid},
    )
    refused(call(gateway, "GET", "/v1/me", hmac), 401, "'HS256' are not accepted")
    unknown_kid = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": "rotated"})
    refused(call(gateway, "GET", "/v1/me", unknown_kid), 401, "key the provider does not have")
    refused(call(gateway, "GET", "/v1/me", "eyJhbGciOi.not-json.x"), 401, "not a well-formed JWT")

    # Signed with the provider's own key, but for another client or naming another issuer.
    other_client = provider.sign({**claims, "aud": "another-app", "azp": "another-app"})
    refused(call(gateway, "GET", "/v1/me", other_client), 401, "meant for another client")
    other_issuer = provider.sign({**claims, "iss": "https://evil.example"})
    refused(call(gateway, "GET", "/v1/me", other_issuer), 401, "another issuer")
    assert call(gateway, "GET", "/v1/me", provider.sign(claims)).status_code == 200


def test_a_revoked_user_is_refused_at_the_next_check(gateway, provider):
    bob = provider.tokens("bob")["access_token"]
    assert call(gateway, "GET", "/v1/me", bob).status_code == 200
    provider.revoke("bob")

    def refused_now():
        resp = call(gateway, "GET", "/v1/me", bob)
        return resp if resp.status_code != 200 else None

    resp = wait_for(refused_now, timeout=RECHECK_S + 10, what="bob refused", interval=0.2)
    refused(resp, 401, "does not accept")
    assert call(gateway, "GET", "/v1/me", provider.tokens("bob")["access_token"]).status_code == 200


def test_provider_down_is_503_and_back_with_a_new_key(gateway, provider):
    alice = provider.tokens("alice")["access_token"]
    assert call(gateway, "GET", "/v1/me", alice).status_code == 200
    fresh = provider.tokens("carol")["access_token"]
    provider.stop()
    refused(call(gateway, "GET", "/v1/me", fresh), 503, "cannot be reached")
    time.sleep(RECHECK_S + 0.1)  # alice's token is due for its next check
    refused(call(gateway, "GET", "/v1/me", alice), 503, "cannot be reached")

    # The provider comes back at the same address with another signing key (a rotation): the
    # gateway reads the keys again for the unknown key id (at most every 10 s).
    with running_provider(urlsplit(provider.issuer).port) as again:
        again.set_user("alice", {"preferred_username": "alice", "groups": ["it-admins"]})
        token = again.tokens("alice")["access_token"]
        assert jwt.get_unverified_header(token)["kid"] != jwt.get_unverified_header(alice)["kid"]

        def accepted():
            return call(gateway, "GET", "/v1/me", token).status_code == 200

        wait_for(accepted, timeout=30, what="the new key accepted", interval=1)
        # alice's old token was signed with a key the provider no longer has.
        time.sleep(RECHECK_S + 0.1)
        refused(call(gateway, "GET", "/v1/me", alice), 401, "does not")


def test_id_tokens_are_bearers_until_they_expire_without_recheck(id_token_gateway):
    gateway, provider = id_token_gateway
    alice = provider.tokens("alice")["id_token"]
    bob = provider.tokens("bob")["id_token"]
    me = call(gateway, "GET", "/v1/me", alice).json()
    assert me == {**me, "user": "alice", "role": "admin", "kind": "oidc", "single_user": False}
    me = call(gateway, "GET", "/v1/me", bob).json()
    assert me == {**me, "user": "bob", "role": "user", "groups": ["eng"]}
    assert call(gateway, "GET", "/admin/instances", alice).status_code == 200
    refused(call(gateway, "GET", "/admin/instances", bob), 403, "not an admin")
    assert call(gateway, "GET", "/v1/knowledge_bases", bob).json()["data"] == []
    mallory = provider.tokens("mallory")["id_token"]
    refused(call(gateway, "GET", "/v1/me", mallory), 403, "none of the groups allowed")
    # Nothing asks the provider again (docs/oidc.md's trade-off): a revoked user keeps access
    # until the token expires, and not a moment after.
    provider.revoke("bob")
    assert call(gateway, "GET", "/v1/me", bob).status_code == 200
    expires = jwt.decode(bob, options={"verify_signature": False})["exp"]
    assert expires <= time.time() + ID_TOKEN_TTL_S
    time.sleep(max(0.0, expires + LEEWAY_S + 0.5 - time.time()))
    refused(call(gateway, "GET", "/v1/me", bob), 401, "expired")
