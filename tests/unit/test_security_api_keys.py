"""API keys: shown once, stored hashed; unknown, expired and revoked keys are refused."""

from __future__ import annotations

import datetime as dt
import stat

import pytest

from appliance.gateway.auth import LOCAL_ADMIN, Authenticator
from appliance.gateway.protocol import RequestError
from security.api_keys import ApiKeyStore, KeyRefused


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
    auth = Authenticator(tmp_path / "keys.json")
    assert auth.principal(None) == LOCAL_ADMIN
    secret, _ = ApiKeyStore(tmp_path / "keys.json").create("root", role="admin")
    with pytest.raises(RequestError) as err:
        auth.principal(None)
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert auth.principal(f"Bearer {secret}").admin
