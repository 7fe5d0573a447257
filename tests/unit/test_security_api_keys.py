"""API keys: shown once, stored hashed; unknown, expired and revoked keys are refused."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from appliance.security.api_keys import ApiKeyStore, KeyRefused

from appliance.config.gateway import GatewaySettings
from appliance.gateway.auth import LOCAL_ADMIN, Authenticator
from appliance.gateway.protocol import RequestError


def test_create_authenticate_revoke(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.json")
    secret, record = store.create("alice", groups=["ml"])
    assert secret.startswith("ak-") and secret not in (tmp_path / "keys.json").read_text()
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    who = store.authenticate(secret)
    assert who.user == "alice" and who.groups == {"ml"} and not who.admin
    with pytest.raises(KeyRefused, match="unknown API key"):
        store.authenticate(secret + "x")
    with pytest.raises(KeyRefused, match="required"):
        store.authenticate(None)
    store.revoke(record.key_id)
    with pytest.raises(KeyRefused, match=f"{record.key_id} was revoked"):
        store.authenticate(secret)
    with pytest.raises(KeyRefused, match="no API key with id"):
        store.revoke("nope")


def test_expired_key_is_refused(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.json")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    secret, _ = store.create("bob", expires_at=past)
    with pytest.raises(KeyRefused, match="expired at"):
        store.authenticate(secret)


def test_gateway_is_single_user_until_the_first_key(tmp_path):
    auth = Authenticator(tmp_path / "keys.json", tmp_path / "users.json", GatewaySettings())
    assert auth.principal(None) == LOCAL_ADMIN
    secret, _ = ApiKeyStore(tmp_path / "keys.json").create("root", role="admin")
    with pytest.raises(RequestError) as err:
        auth.principal(None)
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert auth.principal(f"Bearer {secret}").admin


def test_sessions_that_ended_are_dropped_but_api_keys_are_kept(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.json")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    _, old_key = store.create("carol", expires_at=past)
    _, old_session = store.create("carol", expires_at=past, kind="session")
    _, revoked = store.create("carol", kind="session")
    store.revoke(revoked.key_id)
    store.create("carol", kind="session")
    kept = {r.key_id for r in store.records()}
    assert old_key.key_id in kept
    assert old_session.key_id not in kept and revoked.key_id not in kept


def test_revoking_a_user_revokes_all_their_keys(tmp_path):
    store = ApiKeyStore(tmp_path / "keys.json")
    mine = [store.create("dave")[0], store.create("dave", kind="session")[0]]
    other, _ = store.create("erin")
    assert store.revoke_user("dave") == 2
    for secret in mine:
        with pytest.raises(KeyRefused, match="revoked"):
            store.authenticate(secret)
    assert store.authenticate(other).user == "erin"
