"""Hostile input through a real gateway: deep or wrongly typed JSON gets a 400 (never a 500),
knowledge-base names are per owner and tell nobody what others have, unsafe names and readers'
uploads are refused, and a malformed DOCX is refused alone while the rest of its upload goes in.
Real gateway, real Slurm, real Chroma and embedding model; no model server is started."""

from __future__ import annotations

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog
from tests.unit.rag_samples import ENCRYPTED, PPMD, docx_bytes, patched

pytestmark = [pytest.mark.slurm]

KBS = "/v1/knowledge_bases"
PUMP = b"# Pump\n\nThe coolant pump part number is XK-4471.\n"


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir))
    keys = ApiKeyStore(settings.api_keys_file)
    users = {
        "alice": keys.create("alice")[0],
        "bob": keys.create("bob")[0],
        "root": keys.create("root", role="admin")[0],
    }
    with running_gateway(settings) as url:
        yield url, users, settings


def call(stack, user: str | None, method: str, path: str, **kw) -> httpx.Response:
    url, users, _ = stack
    headers = {"authorization": f"Bearer {users[user]}"} if user else {}
    return httpx.request(method, url + path, headers=headers, timeout=120, **kw)


def refused(resp: httpx.Response, status: int = 400) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == ("permission_error" if status == 403 else "invalid_request_error")
    return error["message"]


def nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [100, 5000])  # our bound, and past json's recursion limit
@pytest.mark.parametrize(
    ("user", "method", "path"),
    [
        (None, "POST", "/v1/auth/sign_in"),
        ("alice", "POST", KBS),
        ("alice", "POST", "/v1/chat/completions"),
        ("alice", "PUT", "/v1/conversations/c1"),
        ("alice", "POST", "/v1/fine_tuning/jobs"),
        ("root", "POST", "/admin/users"),
    ],
)
def test_deeply_nested_json_is_a_400(stack, user, method, path, depth):
    resp = call(stack, user, method, path, content=nested(depth))
    assert "nested more than" in refused(resp)


def test_wrong_types_are_a_400_that_names_the_field(stack):
    assert call(stack, "alice", "POST", KBS, json={"name": "typed"}).status_code == 201
    for body, field in [
        ({"name": "t1", "readers": 5}, "readers"),
        ({"name": "t2", "readers": "bob"}, "readers"),
    ]:
        assert f"'{field}'" in refused(call(stack, "alice", "POST", KBS, json=body))
    resp = call(stack, "alice", "POST", f"{KBS}/typed/share", json={"readers": "bob"})
    assert "'readers'" in refused(resp)
    assert call(stack, "alice", "GET", f"{KBS}/typed/documents").is_success  # nothing shared
    listed = call(stack, "alice", "GET", KBS).json()["data"]
    assert [kb["name"] for kb in listed] == ["typed"] and listed[0]["readers"] == []
    resp = call(stack, "alice", "POST", f"{KBS}/typed/query", json={"query": "x", "top_k": "abc"})
    assert "'top_k'" in refused(resp)
    chat = {"model": "tiny-chat", "messages": ["hi"], "knowledge_bases": ["typed"]}
    assert "'messages'" in refused(call(stack, "alice", "POST", "/v1/chat/completions", json=chat))
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    resp = call(stack, "alice", "POST", "/v1/chat/completions", json={**chat, "knowledge_bases": 5})
    assert "'knowledge_bases'" in refused(resp)


@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", ".hidden"])
def test_unsafe_names_are_refused(stack, name):
    resp = call(stack, "alice", "POST", KBS, json={"name": name})
    assert "invalid knowledge base name" in refused(resp)


def test_names_are_per_owner_and_tell_nothing_about_others(stack):
    assert call(stack, "alice", "POST", KBS, json={"name": "docs"}).json()["id"] == "alice/docs"
    created = call(stack, "bob", "POST", KBS, json={"name": "docs"})
    assert created.status_code == 201, created.text
    assert (created.json()["id"], created.json()["owner"]) == ("bob/docs", "bob")
    # Bob's own name again is refused as his, whatever Alice has.
    assert "you already have" in refused(call(stack, "bob", "POST", KBS, json={"name": "docs"}))
    # Alice's base and one that does not exist look exactly alike to Bob.
    for method, tail in [("GET", "/documents"), ("DELETE", ""), ("POST", "/query")]:
        answers = [
            call(stack, "bob", method, f"{KBS}/alice/{name}{tail}", json={"query": "x"})
            for name in ("docs", "nothing")
        ]
        assert [a.status_code for a in answers] == [404, 404]
        assert answers[0].text.replace("docs", "NAME") == answers[1].text.replace("nothing", "NAME")
    assert [kb["id"] for kb in call(stack, "bob", "GET", KBS).json()["data"]] == ["bob/docs"]


def test_a_readers_upload_is_a_403_and_changes_nothing(stack):
    share = call(stack, "alice", "POST", f"{KBS}/docs/share", json={"readers": ["bob"]})
    assert share.is_success, share.text
    ids = sorted(kb["id"] for kb in call(stack, "bob", "GET", KBS).json()["data"])
    assert ids == ["alice/docs", "bob/docs"]
    assert call(stack, "bob", "GET", f"{KBS}/alice/docs/documents").is_success
    # As the web app sends it: the id quoted as one path segment.
    assert call(stack, "bob", "GET", f"{KBS}/alice%2Fdocs/documents").is_success
    files = [("files", ("pump.md", PUMP, "text/markdown"))]
    resp = call(stack, "bob", "POST", f"{KBS}/alice/docs/documents", files=files)
    assert "may read but not change" in refused(resp, 403)
    assert call(stack, "alice", "GET", f"{KBS}/docs/documents").json()["data"] == []


def test_a_bad_docx_is_refused_alone_and_the_rest_goes_in(stack):
    files = [
        ("files", ("pump.md", PUMP, "text/markdown")),
        ("files", ("ppmd.docx", patched(docx_bytes(), "[Content_Types].xml", method=PPMD), "")),
        (
            "files",
            ("locked.docx", patched(docx_bytes(), "[Content_Types].xml", flags=ENCRYPTED), ""),
        ),
        ("files", ("good.docx", docx_bytes(), "")),
    ]
    resp = call(stack, "alice", "POST", f"{KBS}/docs/documents", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert sorted(r["filename"] for r in body["results"]) == ["good.docx", "pump.md"]
    refused_files = {e["filename"]: e["message"] for e in body["errors"]}
    assert set(refused_files) == {"ppmd.docx", "locked.docx"}
    assert all("refused" in message for message in refused_files.values())
    docs = call(stack, "alice", "GET", f"{KBS}/docs/documents").json()["data"]
    assert sorted(d["filename"] for d in docs) == ["good.docx", "pump.md"]
    # The reader finds it under the owner's name.
    hits = call(stack, "bob", "POST", f"{KBS}/alice/docs/query", json={"query": "XK-4471"})
    assert hits.json()["data"][0]["knowledge_base"] == "alice/docs"
