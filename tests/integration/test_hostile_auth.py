"""Hostile users against a real gateway (real Slurm, no model instances): oversized bodies
without a key, sign-in name sprays, huge and forged usernames, floods of refused requests, the
API description, forged X-Forwarded-For, and `appliance status` without a key."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from collections import Counter
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.users import UserStore

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings

pytestmark = [pytest.mark.slurm]
TRACKED_NAMES = 10
SMALL = 64 * 1024
MiB = 1024 * 1024


def settings_for(slurm_cluster, tmp, **gateway):
    catalog = f"models:\n  - name: absent\n    source: dir:{tmp / 'nothing'}\n"
    values = {"sign_in_max_failures": 1, "sign_in_tracked_names": TRACKED_NAMES, **gateway}
    return stack_settings(slurm_cluster, tmp, catalog, gateway=values)


def call(url: str, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    return httpx.request(method, url + path, headers=headers, timeout=30, **kw)


def sign_in(url: str, user: str, password: str = "wrong-password", **kw) -> httpx.Response:
    body = {"username": user, "password": password}
    return call(url, "POST", "/v1/auth/sign_in", json=body, **kw)


def gateway_process(url: str) -> psutil.Process:
    port = urlsplit(url).port
    pids = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    }
    assert len(pids) == 1, pids
    return psutil.Process(pids.pop())


def raw_post(url: str, path: str, head: bytes, body: bytes, headers: str) -> int | None:
    """POST over a plain socket: `head`, then `body` repeated until the server answers (or the
    connection ends) or 256 MiB went out; the answer's status, None if none came."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n".encode() + head)
        sent = 0
        try:
            while sent < 256 * MiB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(body)
                sent += len(body)
        except OSError:  # the server answered and closed while we were sending
            pass
        try:
            answer = sock.recv(200)
        except OSError:
            return None
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_hostile_users(slurm_cluster, tmp_path):
    settings = settings_for(slurm_cluster, tmp_path)
    users = UserStore(settings.users_file)
    users.add("alice", "alice-password")
    users.add("bob", "bob-password")
    keys = ApiKeyStore(settings.api_keys_file)
    root, _ = keys.create("root", role="admin")
    revoked, record = keys.create("carol")
    keys.revoke(record.key_id)
    forged = {"x-forwarded-for": "203.0.113.9"}
    with running_gateway(settings) as url:
        gateway = gateway_process(url)
        bob = sign_in(url, "bob", "bob-password", headers=forged).json()["token"]

        # 1. Oversized bodies where no key is needed: 413, and the gateway's memory stays.
        huge = {"username": "x" * (SMALL + 1), "password": "p"}
        refused = call(url, "POST", "/v1/auth/sign_in", json=huge)
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "too_large"
        prefix = b'{"password": "p", "username": "'
        before = gateway.memory_info().rss
        for i in range(8):
            declared = f"content-type: application/json\r\ncontent-length: {150 * MiB}\r\n"
            assert raw_post(url, "/v1/auth/sign_in", prefix, b"x" * MiB, declared) == 413
            chunked = "content-type: application/json\r\ntransfer-encoding: chunked\r\n"
            body = chunk(b"y" * MiB + str(i).encode())
            # Without a declared length the 413 comes once 64 KiB are in, or the connection ends.
            assert raw_post(url, "/v1/auth/sign_in", chunk(prefix), body, chunked) in (413, None)
        grown = gateway.memory_info().rss - before
        assert grown < 40 * MiB, f"the gateway grew by {grown / MiB:.0f} MiB"
        assert sign_in(url, "bob", "bob-password").status_code == 200  # still serving

        # 2. Failure table bounded: a spray of names forgets the oldest, keeps the newest.
        names = [f"spray{i}" for i in range(TRACKED_NAMES + 2)]
        assert {sign_in(url, n).status_code for n in names} == {401}
        assert sign_in(url, names[0]).status_code == 401  # forgotten (beyond the bound)
        locked = sign_in(url, names[-1])
        assert locked.status_code == 429 and names[-1] not in locked.text

        # 3. Names no account can have: refused before any state, never echoed.
        forged_line = "x\n     9 2026-01-01T00:00:00.000+00:00 root user_add mallory" + "z" * 60_000
        long = sign_in(url, forged_line)
        assert long.status_code == 400 and "z" * 100 not in long.text and "mallory" not in long.text

        # 8. Refused attempts: a flood of each kind.
        for _ in range(150):
            assert call(url, "GET", "/v1/me", "ak-nope-x", headers=forged).status_code == 401
        for _ in range(20):
            assert call(url, "GET", "/v1/models", revoked).status_code == 401
            assert call(url, "GET", "/admin/users", bob).status_code == 403
            assert call(url, "GET", "/v1/conversations/theirs", bob).status_code == 404
        huge_upload = f"authorization: Bearer {bob}\r\ncontent-length: {10**12}\r\n"
        assert raw_post(url, "/v1/knowledge_bases/kb/documents", b"", b"", huge_upload) == 413

        # 10. No API description without a key; administrators get the schema.
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert call(url, "GET", path).status_code == 404, path
        assert call(url, "GET", "/admin/openapi.json").status_code == 401
        assert call(url, "GET", "/admin/openapi.json", bob).status_code == 403
        schema = call(url, "GET", "/admin/openapi.json", root).json()
        assert "/v1/chat/completions" in schema["paths"]

        # 11. `appliance status` with keys and without APPLIANCE_API_KEY says what it needs.
        config = settings.state_dir / "gateway-config.yaml"
        argv = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "status"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        status = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert status.returncode != 0 and "Traceback" not in status.stderr, status.stderr
        assert status.stderr.strip().splitlines() == [
            f"error: the gateway at {url} needs an API key: set APPLIANCE_API_KEY "
            "(an administrator makes one with `appliance keys create`)"
        ]
        env["APPLIANCE_API_KEY"] = root
        status = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert status.returncode == 0 and "absent" in status.stdout, status.stderr
    # The gateway has stopped: counted refusals of the last minute were written at shutdown.
    log = AuditLog(settings.audit_dir)
    assert log.verify().ok
    entries = log.entries()
    counted: Counter = Counter()
    windows: Counter = Counter()
    for e in entries:
        if "count" in e["detail"]:
            counted[e["actor"], e["action"], e["detail"]["reason"]] += e["detail"]["count"]
            windows[e["actor"], e["action"], e["detail"]["reason"]] += 1
    assert counted["?", "key_refused", "unknown key"] == 150
    assert counted["carol", "key_refused", "revoked key"] == 20
    assert counted["bob", "admin_refused", "not an administrator"] == 21  # /admin/openapi.json
    assert counted["bob", "not_found", "HTTP 404"] == 20
    assert counted["bob", "upload_refused", "HTTP 413"] == 1
    assert counted["?", "key_refused", "no key"] == 2  # /admin/openapi.json, `status`
    assert counted["?", "body_too_large", "too_large"] >= 9
    assert counted["?", "sign_in_refused", "name too long"] == 1
    assert counted[names[-1], "sign_in_refused", "locked out"] == 1
    assert max(windows.values()) <= 3  # a flood is a few lines (one per minute it spans)
    # Bounded entries: the longest line is small whatever was sent.
    assert max(len(line) for line in log.path.read_text().splitlines()) < 8 * 1024
    one_by_one = {e["actor"] for e in entries if e["action"] == "sign_in_refused"}
    assert one_by_one >= set(names)  # wrong passwords: one entry each (a hash each)
    # Clients are the socket's peer: X-Forwarded-For from an untrusted peer is ignored.
    clients = {c for e in entries for c in e["detail"].get("clients", [e["detail"].get("client")])}
    assert "203.0.113.9" not in json.dumps(entries) and "127.0.0.1" in clients
    signed_in = [e for e in entries if e["action"] == "sign_in" and e["actor"] == "bob"]
    assert signed_in[0]["detail"]["client"] == "127.0.0.1"
    # `appliance audit show` prints the forged name on one escaped line.
    show = [sys.executable, "-m", "appliance.cli.main", "--config", str(config), "audit", "show"]
    out = subprocess.run([*show, "-n", "1000"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == len(entries)


def test_forwarded_for_is_believed_from_a_trusted_proxy(slurm_cluster, tmp_path):
    settings = settings_for(slurm_cluster, tmp_path, trusted_proxies=["127.0.0.1"])
    UserStore(settings.users_file).add("bob", "bob-password")
    with running_gateway(settings) as url:
        headers = {"x-forwarded-for": "203.0.113.9"}
        assert sign_in(url, "bob", "bob-password", headers=headers).status_code == 200
    entries = AuditLog(settings.audit_dir).entries()
    assert [e["detail"]["client"] for e in entries if e["action"] == "sign_in"] == ["203.0.113.9"]
