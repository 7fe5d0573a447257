"""The LDAP client against a real slapd (no gateway): bind as the user and read the groups,
wrong and empty passwords, names carrying DN or filter syntax, a stopped or hanging directory,
StartTLS and ldaps with the directory's CA, an untrusted or misnamed certificate refused."""

from __future__ import annotations

import time

import pytest
from appliance.security.ldap_directory import (
    DirectoryUnavailable,
    InvalidCredentials,
    LdapDirectory,
)

from appliance.config.identity import LdapSettings
from tests.slapd import GROUPS, PEOPLE, USER_DN_TEMPLATE, directory_ldif, running_slapd

USERS = {"alice": "alice-secret", "bob": "bob-secret", "admin": "admin-secret", "x*": "x-secret"}
MEMBERS = {
    "admins": ["alice"],
    "engineering": ["alice", "bob"],
    "staff": ["bob"],
    "wild": ["x*"],
    "xtra": ["bob"],
}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    with running_slapd(tmp_path_factory.mktemp("slapd"), directory_ldif(USERS, MEMBERS)) as s:
        yield s


def directory(slapd, **changes) -> LdapDirectory:
    values = {
        "url": slapd.url,
        "user_dn_template": USER_DN_TEMPLATE,
        "group_base": GROUPS,
        "timeout_s": 1.0,
        **changes,
    }
    return LdapDirectory(LdapSettings(**values))


def test_a_user_binds_and_gets_the_groups(slapd):
    alice = directory(slapd).authenticate("alice", "alice-secret")
    assert alice.dn == f"uid=alice,{PEOPLE}" and alice.groups == ("admins", "engineering")
    bob = directory(slapd).authenticate("bob", "bob-secret")
    assert bob.groups == ("engineering", "staff", "xtra")
    assert directory(slapd, group_base="").authenticate("bob", "bob-secret").groups == ()


def test_wrong_and_empty_passwords_are_refused(slapd):
    with pytest.raises(InvalidCredentials):
        directory(slapd).authenticate("alice", "bob-secret")
    with pytest.raises(InvalidCredentials):
        directory(slapd).authenticate("nobody", "alice-secret")
    # An empty password would be an "unauthenticated bind", which slapd answers with success.
    with pytest.raises(InvalidCredentials):
        directory(slapd).authenticate("alice", "")


@pytest.mark.parametrize(
    "name",
    ["*", "*)(uid=*", "alice)(|(uid=*", "admin,ou=people", f"alice,{PEOPLE}", "alice\\"],
)
def test_names_with_dn_or_filter_syntax_match_no_one_else(slapd, name):
    with pytest.raises(InvalidCredentials):
        directory(slapd).authenticate(name, "alice-secret")
    with pytest.raises(InvalidCredentials):
        directory(slapd).authenticate(name, "admin-secret")


def test_the_directory_ignores_case_and_outer_spaces(slapd):
    """Why password_sources lowercases names and refuses spaces: else `ALICE` and ` alice`
    would be other names here (another lockout counter) for the same directory user."""
    for variant in ("ALICE", " alice", "alice "):
        assert directory(slapd).authenticate(variant, "alice-secret").groups


def test_a_group_filter_with_the_name_cannot_be_widened(slapd):
    # Unescaped, `(cn=x*)` would put the user `x*` in every group whose name starts with x.
    named = directory(slapd, group_filter="(|(member={dn})(cn={username}))")
    assert named.authenticate("x*", "x-secret").groups == ("wild",)


def test_a_stopped_directory_is_unavailable(tmp_path):
    with running_slapd(tmp_path, directory_ldif(USERS, MEMBERS)) as stopped:
        pass
    with pytest.raises(DirectoryUnavailable):
        directory(stopped).authenticate("alice", "alice-secret")


def test_a_hanging_directory_times_out(slapd):
    start = time.monotonic()
    with slapd.paused(), pytest.raises(DirectoryUnavailable):
        directory(slapd, timeout_s=1.0).authenticate("alice", "alice-secret")
    assert time.monotonic() - start < 10
    assert directory(slapd).authenticate("alice", "alice-secret").username == "alice"


@pytest.fixture(scope="module")
def tls_slapd(tmp_path_factory):
    ldif = directory_ldif(USERS, MEMBERS)
    with running_slapd(tmp_path_factory.mktemp("slapd-tls"), ldif, tls=True) as s:
        yield s


def test_start_tls_and_ldaps_with_the_directory_ca(tls_slapd):
    ca = tls_slapd.ca_file
    start_tls = directory(tls_slapd, start_tls=True, ca_file=ca)
    assert start_tls.authenticate("alice", "alice-secret").groups == ("admins", "engineering")
    ldaps = directory(tls_slapd, url=tls_slapd.ldaps_url, ca_file=ca)
    assert ldaps.authenticate("bob", "bob-secret").username == "bob"


def test_a_certificate_not_trusted_or_for_another_name_is_refused(tls_slapd):
    for untrusted in ({"start_tls": True}, {"url": tls_slapd.ldaps_url}):
        # Self-signed: not among the system's CAs.
        with pytest.raises(DirectoryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            directory(tls_slapd, **untrusted).authenticate("alice", "alice-secret")
    # The certificate names 127.0.0.1 only.
    other_name = tls_slapd.ldaps_url.replace("127.0.0.1", "localhost")
    with pytest.raises(DirectoryUnavailable, match="match any name"):
        directory(tls_slapd, url=other_name, ca_file=tls_slapd.ca_file).authenticate(
            "alice", "alice-secret"
        )
