"""LDAP sign-in through a real gateway (real Slurm, no model instances) against a real slapd:
directory users get the mapped role and groups (a group shares a knowledge base), wrong and
empty passwords and names with DN or filter syntax are refused, a user outside the allowed
groups gets 403, local accounts keep working beside the directory (and stop when `local` is not
enabled), no single-user mode with a directory, and a hanging or stopped directory gives 503."""

from __future__ import annotations

import time

import pytest
from appliance.security.audit import AuditLog
from appliance.security.users import UserStore

from appliance_dev.stack import running_gateway
from tests.integration.test_gateway_accounts import call, sign_in
from tests.slapd import GROUPS, PEOPLE, USER_DN_TEMPLATE, directory_ldif, running_slapd
from tests.slurm_fixtures import stack_settings

pytestmark = [pytest.mark.slurm]
USERS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "dave": "dave-secret",
    "mallory": "mallory-secret",
}
MEMBERS = {
    "admins": ["alice"],
    "staff": ["alice", "bob", "dave"],
    "engineering": ["bob"],
    "contractors": ["mallory"],
}
MAX_FAILURES = 3


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    with running_slapd(tmp_path_factory.mktemp("slapd"), directory_ldif(USERS, MEMBERS)) as s:
        yield s


def settings_for(slurm_cluster, slapd, tmp, sources: list[str]):
    identity = {
        "sources": sources,
        "ldap": {
            "url": slapd.url,
            "user_dn_template": USER_DN_TEMPLATE,
            "group_base": GROUPS,
            "timeout_s": 2.0,
        },
        "mapping": {
            "admin_groups": ["admins"],
            "groups": {"engineering": ["eng"]},
            "allowed_groups": ["staff"],
        },
    }
    catalog = f"models:\n  - name: absent\n    source: dir:{tmp / 'nothing'}\n"
    gateway = {"sign_in_max_failures": MAX_FAILURES}
    return stack_settings(slurm_cluster, tmp, catalog, gateway=gateway, identity=identity)


@pytest.fixture(scope="module")
def gateway(slurm_cluster, slapd, tmp_path_factory):
    """A gateway whose password sign-in tries local accounts, then the directory."""
    settings = settings_for(
        slurm_cluster, slapd, tmp_path_factory.mktemp("ldap"), ["local", "ldap"]
    )
    with running_gateway(settings) as url:
        yield url, settings


def token(url: str, user: str) -> str:
    resp = sign_in(url, user, USERS[user])
    assert resp.status_code == 200, resp.text
    return resp.json()["token"]


def test_no_single_user_mode_with_a_directory(gateway):
    url, settings = gateway
    assert not settings.users_file.exists() and not settings.api_keys_file.exists()
    me = call(url, "GET", "/v1/me")
    assert me.status_code == 401  # no local account yet, and still not everyone's admin
    assert call(url, "GET", "/admin/instances").status_code == 401
    answer = sign_in(url, "alice", "wrong-password")
    assert answer.status_code == 401 and not answer.json().get("single_user")


def test_directory_users_get_the_mapped_role_and_groups(gateway):
    url, _ = gateway
    alice = sign_in(url, "alice", "alice-secret").json()
    assert alice == {**alice, "user": "alice", "role": "admin", "kind": "session"}
    assert alice["groups"] == ["admins", "staff"]
    assert call(url, "GET", "/admin/instances", alice["token"]).status_code == 200
    bob = sign_in(url, "bob", "bob-secret").json()
    assert (bob["role"], bob["groups"]) == ("user", ["eng", "staff"])
    me = call(url, "GET", "/v1/me", bob["token"]).json()
    assert me == {**me, "user": "bob", "role": "user", "groups": ["eng", "staff"]}
    assert call(url, "GET", "/admin/instances", bob["token"]).status_code == 403
    # The directory ignores case: one name here, whichever way it is typed.
    assert sign_in(url, "BOB", "bob-secret").json()["user"] == "bob"


def test_a_directory_group_shares_a_knowledge_base(gateway):
    url, _ = gateway
    alice, bob, dave = token(url, "alice"), token(url, "bob"), token(url, "dave")
    made = call(
        url, "POST", "/v1/knowledge_bases", alice, json={"name": "handbook", "groups": ["eng"]}
    )
    assert made.status_code == 201, made.text
    seen = call(url, "GET", "/v1/knowledge_bases", bob).json()["data"]
    assert [kb["id"] for kb in seen] == ["alice/handbook"]  # bob is in engineering: eng
    assert call(url, "GET", "/v1/knowledge_bases", dave).json()["data"] == []  # not in it
    docs = call(url, "GET", "/v1/knowledge_bases/alice/handbook/documents", dave)
    assert docs.status_code == 404


def test_wrong_and_empty_passwords_are_refused(gateway):
    url, _ = gateway
    wrong = sign_in(url, "bob", "alice-secret")
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "wrong username or password"
    # An empty password would be an unauthenticated bind, which slapd calls a success.
    for name in ("bob", "nobody"):
        empty = sign_in(url, name, "")
        assert empty.status_code == 401 and "token" not in empty.json()
    assert sign_in(url, "bob", "bob-secret").status_code == 200  # the failures are cleared


def test_wrong_passwords_lock_a_directory_name_out(gateway):
    url, _ = gateway
    for variant in ["dave", "Dave", "DAVE"][:MAX_FAILURES]:
        assert sign_in(url, variant, "guess").status_code == 401
    locked = sign_in(url, "dave", "dave-secret")
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0


@pytest.mark.parametrize(
    "name", ["*", "*)(uid=*", "alice)(|(uid=*", "admin,ou=x", f"bob,{PEOPLE}", " alice", "a\\"]
)
def test_names_with_dn_or_filter_syntax_are_refused(gateway, name):
    url, _ = gateway
    for password in ("alice-secret", "bob-secret"):  # names stay <= 32 characters (else 400)
        answer = sign_in(url, name, password)
        assert answer.status_code in (401, 429) and "token" not in answer.json(), answer.text


def test_a_user_outside_the_allowed_groups_is_refused(gateway):
    url, _ = gateway
    refused = sign_in(url, "mallory", "mallory-secret")
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "sign_in_not_allowed"


def test_local_accounts_work_beside_the_directory(gateway):
    url, settings = gateway
    UserStore(settings.users_file).add("carol", "carol-password", groups=["ml"])
    carol = sign_in(url, "carol", "carol-password").json()
    assert (carol["user"], carol["role"], carol["groups"]) == ("carol", "user", ["ml"])
    # A local account answers for its name: the directory's alice is not a local one.
    assert sign_in(url, "carol", "bob-secret").status_code == 401


def test_the_audit_log_names_the_source(gateway):
    _, settings = gateway
    entries = list(AuditLog(settings.audit_dir).entries())
    sign_ins = {
        (e["actor"], e["detail"].get("source")) for e in entries if e["action"] == "sign_in"
    }
    assert {("alice", "ldap"), ("bob", "ldap"), ("carol", "local")} <= sign_ins
    alice = next(e for e in entries if e["action"] == "sign_in" and e["actor"] == "alice")
    assert alice["detail"]["role"] == "admin" and alice["detail"]["groups"] == ["admins", "staff"]
    refused = {e["actor"] for e in entries if e["action"] == "sign_in_refused"}
    assert "mallory" in refused


def test_a_hanging_then_stopped_directory_gives_503(gateway, slapd):
    url, _ = gateway
    start = time.monotonic()
    with slapd.paused():
        hanging = sign_in(url, "bob", "bob-secret")
    assert hanging.status_code == 503, hanging.text
    assert hanging.json()["error"]["code"] == "directory_unavailable"
    assert time.monotonic() - start < 15  # the timeout (2 s), not the client's 30
    slapd.process.terminate()
    slapd.process.wait(timeout=10)
    stopped = sign_in(url, "bob", "bob-secret")
    assert stopped.status_code == 503 and "directory" in stopped.json()["error"]["message"]
    assert sign_in(url, "carol", "carol-password").status_code == 200  # local still works


def test_local_accounts_are_refused_when_local_is_not_enabled(slurm_cluster, tmp_path):
    with running_slapd(tmp_path / "slapd", directory_ldif(USERS, MEMBERS)) as slapd:
        settings = settings_for(slurm_cluster, slapd, tmp_path / "gw", ["ldap"])
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        UserStore(settings.users_file).add("carol", "carol-password")
        UserStore(settings.users_file).add("admin", "admin-password", role="admin")
        with running_gateway(settings) as url:
            assert sign_in(url, "carol", "carol-password").status_code == 401
            assert sign_in(url, "admin", "admin-password").status_code == 401
            assert sign_in(url, "alice", "alice-secret").json()["role"] == "admin"
