"""The cookie that lets a signed-in page use the web app's file endpoints: sealed with the web
app's secret, worthless when altered or sealed by another secret; which paths it guards."""

from __future__ import annotations

import pytest

from appliance.webapp.files_guard import guarded, seal, ticket, unseal

SECRET = "a" * 32


def test_a_sealed_token_opens_only_with_the_same_secret():
    sealed = seal(SECRET, "session-token")
    assert "session-token" not in sealed
    assert unseal(SECRET, sealed) == "session-token"
    assert unseal("b" * 32, sealed) is None
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert unseal(SECRET, flipped) is None
    for junk in ("", "x", "%%%", seal(SECRET, "t")[:10]):
        assert unseal(SECRET, junk) is None


def test_the_page_keeps_a_ticket_only_while_signed_in():
    assert ticket(SECRET, {}) == "" and ticket(SECRET, None) == ""
    assert unseal(SECRET, ticket(SECRET, {"user": "bob", "token": "t1"})) == "t1"
    # Single-user mode: no token, still signed in (the gateway decides on each request).
    assert unseal(SECRET, ticket(SECRET, {"user": "admin", "token": ""})) == ""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/gradio_api/upload", True),
        ("/gradio_api/upload_progress", True),
        ("//gradio_api//upload", True),
        ("/gradio_api/file=/var/lib/appliance/webapp/uploads/x/a.pdf", True),
        ("/gradio_api/file/x/a.pdf", True),
        ("/gradio_api/queue/join", False),
        ("/health", False),
        ("/", False),
    ],
)
def test_guarded_paths(path, expected):
    assert guarded(path) is expected
