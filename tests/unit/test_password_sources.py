"""Password sign-in without a directory running: DN and filter escaping, an empty password never
sent, which source answers for which name, 503 and no lockout count while the directory cannot
be reached, and no single-user mode once a directory is enabled. (With a real slapd:
tests/integration/test_ldap_directory.py and test_ldap_sign_in.py.)"""

from __future__ import annotations

import pytest
from appliance.security.ldap_directory import (
    DirectoryUnavailable,
    InvalidCredentials,
    LdapDirectory,
    group_filter,
    user_dn,
)
from appliance.security.password_sources import PasswordSources
from appliance.security.users import SignInRefused, UserStore

from appliance.config.gateway import GatewaySettings
from appliance.config.identity import IdentitySettings, LdapSettings
from appliance.gateway.auth import Authenticator
from appliance.gateway.protocol import RequestError
from appliance_dev.stack import free_port

TEMPLATE = "uid={username},ou=people,dc=example,dc=org"


def closed_directory(**changes) -> LdapSettings:
    """A directory on a loopback port where nothing listens: any attempt to reach it fails."""
    url = f"ldap://127.0.0.1:{free_port()}"
    return LdapSettings(url=url, user_dn_template=TEMPLATE, timeout_s=1.0, **changes)


def identity(*sources: str) -> IdentitySettings:
    return IdentitySettings(sources=list(sources), ldap=closed_directory())


@pytest.fixture
def users(tmp_path) -> UserStore:
    store = UserStore(tmp_path / "users.json")
    store.add("carol", "carol-password", groups=["ml"])
    return store


@pytest.mark.parametrize(
    ("name", "dn_value"),
    [
        ("alice", "alice"),
        ("admin,ou=x", "admin\\,ou\\=x"),
        ("a+b=c", "a\\+b\\=c"),
        (" alice ", "\\ alice\\ "),
        ("#x", "\\#x"),
        ('q"<>;\\', 'q\\"\\<\\>\\;\\\\'),
    ],
)
def test_a_name_is_one_escaped_dn_value(name, dn_value):
    assert user_dn(TEMPLATE, name) == f"uid={dn_value},ou=people,dc=example,dc=org"


def test_an_empty_name_has_no_dn():
    with pytest.raises(InvalidCredentials):
        user_dn(TEMPLATE, "")


def test_filter_values_are_escaped():
    template = "(|(member={dn})(memberUid={username}))"
    made = group_filter(template, "uid=a\\,b,dc=x", "*)(uid=*")
    assert made == "(|(member=uid=a\\5c,b,dc=x)(memberUid=\\2a\\29\\28uid=\\2a))"


def test_an_empty_password_is_never_sent():
    # Refused before any connection: with a real attempt, this would be DirectoryUnavailable.
    with pytest.raises(InvalidCredentials):
        LdapDirectory(closed_directory()).authenticate("alice", "")
    with pytest.raises(DirectoryUnavailable):
        LdapDirectory(closed_directory()).authenticate("alice", "x")


def test_a_local_account_answers_for_its_name(users):
    sources = PasswordSources(identity("local", "ldap"), users)
    signed_in = sources.verify("carol", "carol-password")
    assert (signed_in.username, signed_in.groups, signed_in.source) == ("carol", ("ml",), "local")
    with pytest.raises(SignInRefused):  # not DirectoryUnavailable: the directory was not asked
        sources.verify("carol", "wrong-password")
    with pytest.raises(DirectoryUnavailable):  # no local account: the directory is asked
        sources.verify("dave", "dave-password")


def test_local_accounts_answer_after_an_unreachable_directory(users):
    sources = PasswordSources(identity("ldap", "local"), users)
    assert sources.verify("carol", "carol-password").source == "local"
    with pytest.raises(SignInRefused):  # the local account's answer, not "try again later"
        sources.verify("carol", "wrong-password")
    with pytest.raises(DirectoryUnavailable):
        sources.verify("dave", "dave-password")


def test_without_local_a_local_account_is_refused(users):
    sources = PasswordSources(identity("ldap"), users)
    with pytest.raises(DirectoryUnavailable):
        sources.verify("carol", "carol-password")  # asked of the directory, not the file


@pytest.mark.parametrize("name", ["*", "*)(uid=*", "admin,ou=x", " alice", "Alice", "al ice", ""])
def test_names_outside_the_directory_alphabet_are_not_sent(users, name):
    sources = PasswordSources(identity("ldap"), users)
    with pytest.raises(SignInRefused):
        sources.verify(name, "some-password")
    with pytest.raises(SignInRefused):
        sources.verify("alice", "")


def test_names_are_lowercased_only_with_a_directory(users):
    assert PasswordSources(identity("local", "ldap"), users).canonical("Alice") == "alice"
    assert PasswordSources(identity("local"), users).canonical("Alice") == "Alice"


def test_a_directory_ends_single_user_mode(tmp_path):
    settings = GatewaySettings()
    local = Authenticator(tmp_path / "keys.json", tmp_path / "users.json", settings)
    assert local.single_user
    with_ldap = Authenticator(
        tmp_path / "keys.json", tmp_path / "users.json", settings, identity("local", "ldap")
    )
    assert not with_ldap.single_user
    with pytest.raises(RequestError) as refused:
        with_ldap.principal(None)
    assert refused.value.status == 401


def test_an_unreachable_directory_is_503_and_not_a_failure(tmp_path):
    settings = GatewaySettings(sign_in_max_failures=1)
    auth = Authenticator(
        tmp_path / "keys.json", tmp_path / "users.json", settings, identity("ldap")
    )
    for _ in range(3):  # never locked out: the directory, not the password, failed
        with pytest.raises(RequestError) as err:
            auth.sign_in("dave", "dave-password")
        assert err.value.status == 503 and err.value.code == "directory_unavailable"
    with pytest.raises(RequestError) as err:
        auth.sign_in("dave", "")
    assert err.value.status == 401
