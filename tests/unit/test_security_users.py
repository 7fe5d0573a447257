"""Accounts: passwords stored as scrypt hashes in a 0600 file; sign-in refuses wrong names and
passwords alike, disabled accounts, and locks a name out after repeated failures."""

from __future__ import annotations

import stat

import pytest
from appliance.security.users import SignInRefused, UserError, UserStore

from appliance.config.gateway import GatewaySettings
from appliance.gateway.auth import Authenticator
from appliance.gateway.protocol import RequestError


def test_accounts_keep_only_password_hashes(tmp_path):
    users = UserStore(tmp_path / "users.json")
    users.add("alice", "correct horse", "admin", ["ml"])
    text = (tmp_path / "users.json").read_text()
    assert "correct horse" not in text and "scrypt$" in text
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    record = users.verify("alice", "correct horse")
    assert record.principal().admin and record.principal().groups == {"ml"}


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("Alice", "long enough", "invalid username"),
        ("../root", "long enough", "invalid username"),
        ("carol\n", "long enough", "invalid username"),
        ("bob", "short", "at least 8"),
        ("alice", "long enough", "already exists"),
    ],
)
def test_bad_accounts_are_refused(tmp_path, name, password, message):
    users = UserStore(tmp_path / "users.json")
    users.add("alice", "first password")
    with pytest.raises(UserError, match=message):
        users.add(name, password)


def test_wrong_name_and_wrong_password_look_the_same(tmp_path):
    users = UserStore(tmp_path / "users.json")
    users.add("alice", "correct horse")
    for name, password in (("alice", "wrong horse"), ("nobody", "correct horse")):
        with pytest.raises(SignInRefused, match=r"^wrong username or password$"):
            users.verify(name, password)
    users.set_disabled("alice", True)
    with pytest.raises(SignInRefused, match="disabled"):
        users.verify("alice", "correct horse")
    users.set_disabled("alice", False)
    users.set_password("alice", "new horse battery")
    assert users.verify("alice", "new horse battery").username == "alice"
    users.remove("alice")
    with pytest.raises(SignInRefused):
        users.verify("alice", "new horse battery")


def test_sign_in_gives_a_session_key_and_locks_out_guessing(tmp_path):
    settings = GatewaySettings(sign_in_max_failures=3, sign_in_lockout_s=60, session_ttl_s=600)
    auth = Authenticator(tmp_path / "keys.json", tmp_path / "users.json", settings)
    auth.users.add("alice", "correct horse")
    assert not auth.single_user  # an account exists: keys are required from now on
    secret, record, source = auth.sign_in("alice", "correct horse")
    assert record.kind == "session" and record.expires_at and source == "local"
    assert auth.principal(f"Bearer {secret}").user == "alice"
    for _ in range(3):
        with pytest.raises(RequestError) as err:
            auth.sign_in("alice", "guess")
        assert err.value.status == 401
    with pytest.raises(RequestError) as err:
        auth.sign_in("alice", "correct horse")  # right, but too late: locked out for a while
    assert err.value.status == 429 and int(err.value.headers["retry-after"]) > 0
