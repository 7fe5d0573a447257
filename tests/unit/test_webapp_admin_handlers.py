"""The Admin tab's handlers without a browser: what administrators see, what others do not, and
keys shown once."""

from __future__ import annotations

import gradio as gr
import pytest

from appliance.webapp import admin_view
from tests.unit.webapp_fakes import ADMIN, REFUSED, USER, FakeClient, context, given, run

USERS = [
    {"user": "alice", "role": "admin", "groups": ["ops", "eng"], "created_at": "d", "disabled": 0},
    {"user": "bob", "role": "user", "groups": [], "created_at": "d", "disabled": 1},
]
KEYS = [
    {"key_id": "k1", "user": "bob", "role": "user", "created_at": "d", "expires_at": None}
    | {"revoked_at": None},
    {"key_id": "k2", "user": "bob", "role": "user", "created_at": "d", "expires_at": "e"}
    | {"revoked_at": "r"},
]
USAGE = [
    {"kind": "user", "name": "bob", "requests_last_minute": 2, "tokens_today": 40}
    | {"streams_open": 0, "limits": {"requests_per_minute": 60, "tokens_per_day": None}},
]
AUDIT = {
    "verification": {"ok": False, "line": 7, "problem": "hash mismatch", "entries": 9},
    "entries": [
        {"seq": 1, "time": "t", "actor": "alice", "action": "add_user", "target": "bob"}
        | {"detail": {"role": "user"}}
    ],
}
CLIENT = {"users": USERS, "keys": KEYS, "usage": USAGE, "audit": AUDIT}


def test_administrators_see_users_keys_usage_and_a_tampered_audit_log():
    users, pick_user, keys, pick_key, usage, status, audit = run(
        admin_view.refresh(context(FakeClient(**CLIENT)), ADMIN)
    )
    assert users[0] == ["alice", "admin", "ops,eng", "d", ""] and users[1][-1] == "yes"
    assert given(pick_user)["choices"] == ["alice", "bob"]
    assert keys[0][4:] == ["never", ""] and keys[1][4:] == ["e", "r"]
    assert given(pick_key)["choices"] == ["k1"]  # a revoked key cannot be revoked again
    assert usage == [["user", "bob", 2, 40, 0, "requests per minute 60"]]
    assert status == "**Audit log TAMPERED** at line 7: hash mismatch"
    assert audit == [[1, "t", "alice", "add_user", "bob", "role=user"]]


def test_others_see_nothing_and_a_refusal_is_shown_in_place_of_the_audit_status():
    assert run(admin_view.refresh(context(FakeClient(**CLIENT)), USER)) == [gr.skip()] * 7
    shown = run(admin_view.refresh(context(FakeClient(users=REFUSED)), ADMIN))
    assert shown[5] == "Not available: not allowed"
    note, body, key = admin_view.show(USER)
    assert given(note) == {"visible": True} and given(body) == {"visible": False}
    assert given(key) == {"value": "", "visible": False}


def test_users_and_keys():
    client = FakeClient(create_key={"key": "sk-new"})
    ctx = context(client)
    assert run(admin_view.add_user(ctx, ADMIN, " carol ", "pw-123456", "user", "ops")) == ("", "")
    assert client.called("add_user") == [("t-alice", "carol", "pw-123456", "user", ["ops"])]
    run(admin_view.disable(ctx, ADMIN, "bob"))
    assert client.called("set_user_enabled") == [("t-alice", "bob", False)]
    shown = run(admin_view.create_key(ctx, ADMIN, "bob", "user", 0))
    assert given(shown) == {"value": "sk-new", "visible": True}
    assert client.called("create_key") == [("t-alice", "bob", "user", None)]  # 0: never expires
    with pytest.warns(UserWarning, match="Choose a key"):
        run(admin_view.revoke(ctx, ADMIN, None))
    assert client.called("revoke_key") == []
