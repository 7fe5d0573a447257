"""Accounts through the gateway's HTTP API: sign in with a password or a key, who am I, sign out,
lockout, conversations saved per user, and warming a model. Real gateway, real Slurm."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.users import UserStore

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm]


@pytest.fixture(scope="module")
def gateway(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accounts")
    absent = f"  - name: absent\n    source: dir:{tmp / 'nothing'}\n"
    settings = stack_settings(
        slurm_cluster,
        tmp,
        tiny_catalog(tiny_model_dir, absent),
        gateway={"sign_in_max_failures": 3, "max_request_bytes": 4096},
        security={"user_quotas": {"quota": {"requests_per_minute": 2}}},
    )
    with running_gateway(settings) as url:
        yield url, settings


def call(url: str, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url + path, headers=headers, timeout=30, **kw)


def sign_in(url: str, user: str, password: str) -> httpx.Response:
    return call(url, "POST", "/v1/auth/sign_in", json={"username": user, "password": password})


def test_single_user_until_the_first_account(gateway):
    url, settings = gateway
    me = call(url, "GET", "/v1/me").json()
    assert me["single_user"] and me["role"] == "admin"
    UserStore(settings.users_file).add("alice", "alice-password")
    UserStore(settings.users_file).add("bob", "bob-password", groups=["ml"])
    assert call(url, "GET", "/v1/me").status_code == 401


def test_password_sign_in_me_and_sign_out(gateway):
    url, _ = gateway
    resp = sign_in(url, "bob", "bob-password")
    assert resp.status_code == 200, resp.text
    account = resp.json()
    assert account["user"] == "bob" and account["kind"] == "session" and account["groups"] == ["ml"]
    token = account["token"]
    me = call(url, "GET", "/v1/me", token).json()
    assert me == {**me, "user": "bob", "role": "user", "single_user": False, "kind": "session"}
    assert call(url, "GET", "/v1/models", token).status_code == 200
    assert call(url, "GET", "/admin/instances", token).status_code == 403
    assert call(url, "POST", "/v1/auth/sign_out", token).json() == {"signed_out": True}
    refused = call(url, "GET", "/v1/me", token)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_api_key_sign_in_does_not_end_the_key(gateway):
    url, settings = gateway
    key, _ = ApiKeyStore(settings.api_keys_file).create("carol")
    account = call(url, "POST", "/v1/auth/sign_in", json={"api_key": key}).json()
    assert account["user"] == "carol" and account["kind"] == "api" and account["token"] == key
    assert call(url, "POST", "/v1/auth/sign_out", key).json() == {"signed_out": False}
    assert call(url, "GET", "/v1/me", key).status_code == 200
    bad = call(url, "POST", "/v1/auth/sign_in", json={"api_key": key + "x"})
    assert bad.status_code == 401


def test_repeated_wrong_passwords_lock_the_name_out(gateway):
    url, _ = gateway
    for _ in range(3):
        resp = sign_in(url, "alice", "guess")
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == "wrong username or password"
    locked = sign_in(url, "alice", "alice-password")
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert sign_in(url, "bob", "bob-password").status_code == 200  # other names are not affected
    assert call(url, "POST", "/v1/auth/sign_in", content=b"{").status_code == 400


def test_saved_conversations_belong_to_their_user(gateway):
    url, settings = gateway
    bob = sign_in(url, "bob", "bob-password").json()["token"]
    dave_key, _ = ApiKeyStore(settings.api_keys_file).create("dave")
    chat = {
        "title": "pumps",
        "messages": [{"role": "user", "content": "XK-4471?"}],
        "updated_at": "2026-11-21T10:00:00+00:00",
    }
    assert call(url, "PUT", "/v1/conversations/c1", bob, json=chat).status_code == 200
    saved = call(url, "GET", "/v1/conversations", bob).json()["data"]
    assert [c["id"] for c in saved] == ["c1"] and saved[0]["title"] == "pumps"
    assert call(url, "GET", "/v1/conversations", dave_key).json()["data"] == []
    assert call(url, "GET", "/v1/conversations/c1", dave_key).status_code == 404
    files = list(settings.conversations_dir.rglob("*.json"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    # Bad ids, bodies and sizes are refused; nothing is written for them.
    assert call(url, "PUT", "/v1/conversations/..%2Fx", bob, json=chat).status_code in (400, 404)
    assert call(url, "PUT", "/v1/conversations/c2", bob, json={"title": "x"}).status_code == 400
    big = {**chat, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert call(url, "PUT", "/v1/conversations/c3", bob, json=big).status_code == 413
    assert call(url, "DELETE", "/v1/conversations", bob).json() == {"deleted": 1}
    assert call(url, "GET", "/v1/conversations", bob).json()["data"] == []


def test_warming_a_model_starts_it_once(gateway):
    url, _ = gateway
    bob = sign_in(url, "bob", "bob-password").json()["token"]
    assert call(url, "POST", "/v1/models/nope/warm", bob).status_code == 404
    absent = call(url, "POST", "/v1/models/absent/warm", bob)
    assert absent.status_code == 503 and absent.json()["error"]["code"] == "model_not_installed"
    first = call(url, "POST", "/v1/models/tiny-chat/warm", bob)
    assert first.status_code == 202 and first.json()["state"] == "starting"
    assert call(url, "POST", "/v1/models/tiny-chat/warm", bob).json()["state"] == "starting"
    admin_key, _ = ApiKeyStore(gateway[1].api_keys_file).create("root", role="admin")
    instances = call(url, "GET", "/admin/instances", admin_key).json()["instances"]
    assert len([i for i in instances if i["model"] == "tiny-chat"]) == 1


def test_admins_manage_users_and_keys_through_the_api(gateway):
    url, settings = gateway
    root, _ = ApiKeyStore(settings.api_keys_file).create("root", role="admin")
    bob = sign_in(url, "bob", "bob-password").json()["token"]
    assert call(url, "GET", "/admin/users", bob).status_code == 403
    body = {"user": "dora", "password": "dora-password", "groups": ["ml"]}
    assert call(url, "POST", "/admin/users", root, json=body).status_code == 201
    assert sign_in(url, "dora", "dora-password").status_code == 200
    short = call(url, "POST", "/admin/users", root, json={"user": "eve", "password": "x"})
    assert short.status_code == 400 and "at least 8" in short.json()["error"]["message"]
    made = call(url, "POST", "/admin/keys", root, json={"user": "dora", "expires_in_days": 30})
    key = made.json()["key"]
    assert made.status_code == 201 and key.startswith("ak-") and made.json()["expires_at"]
    listed = call(url, "GET", "/admin/keys", root).json()["data"]
    assert all("key_hash" not in k and "key" not in k for k in listed)
    assert call(url, "GET", "/v1/me", key).json()["user"] == "dora"
    assert call(url, "POST", f"/admin/keys/{made.json()['key_id']}/revoke", root).is_success
    assert call(url, "GET", "/v1/me", key).status_code == 401
    disabled = call(url, "POST", "/admin/users/dora/disable", root).json()
    assert disabled["disabled"] and disabled["keys_revoked"] >= 1  # her sign-in session too
    refused = sign_in(url, "dora", "dora-password")
    assert refused.status_code == 401 and "disabled" in refused.json()["error"]["message"]
    log = call(url, "GET", "/admin/audit", root, params={"limit": 500}).json()
    assert log["verification"]["ok"]
    done = {(e["actor"], e["action"], e["target"]) for e in log["entries"]}
    assert {("root", "user_add", "dora"), ("root", "user_disable", "dora")} <= done


def test_quota_refuses_the_request_after_the_limit(gateway):
    url, settings = gateway
    UserStore(settings.users_file).add("quota", "quota-password")
    token = sign_in(url, "quota", "quota-password").json()["token"]
    chat = {"model": "tiny-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    for _ in range(2):
        resp = httpx.post(
            url + "/v1/chat/completions",
            json=chat,
            timeout=300,
            headers={"authorization": f"Bearer {token}"},
        )
        assert resp.status_code == 200, resp.text
    refused = httpx.post(
        url + "/v1/chat/completions",
        json=chat,
        timeout=30,
        headers={"authorization": f"Bearer {token}"},
    )
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "quota_exceeded"
    usage = {u["kind"]: u for u in call(url, "GET", "/v1/usage", token).json()["data"]}
    assert usage["user"]["requests_last_minute"] == 2 and usage["user"]["tokens_today"] > 0
    assert usage["user"]["limits"]["requests_per_minute"] == 2


def test_audit_log_records_actions_and_finds_tampering(gateway):
    _, settings = gateway
    log = AuditLog(settings.audit_dir)
    actions = {(e["actor"], e["action"]) for e in log.entries()}
    expected = [
        ("bob", "sign_in"),
        ("alice", "sign_in_refused"),
        ("bob", "sign_out"),
        ("carol", "sign_in"),
        ("bob", "model_start"),
        ("quota", "key_use"),
    ]
    for pair in expected:
        assert pair in actions, (pair, sorted(actions))
    assert not any(e["action"] == "prompt" for e in log.entries())  # prompts are off by default
    config = settings.state_dir / "gateway-config.yaml"
    cli = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "audit", "verify"]
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stderr
    text = log.path.read_text().splitlines()
    text[1] = (
        text[1].replace('"sign_in"', '"sign_out"', 1)
        if '"sign_in"' in text[1]
        else text[1][:-2] + " }"
    )
    log.path.write_text("\n".join(text) + "\n")
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "TAMPERED at line 2" in bad.stderr, bad.stderr
