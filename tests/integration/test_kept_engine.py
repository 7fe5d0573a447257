"""Kept engines through the whole stack: a local Slurm cluster, the node's real standby, the
gateway and encrypted models. The first instance's server comes from the standby; once its job
ends the standby keeps it, and the next job of a model with the same files (another name)
takes it over, loads its weights through the claim route and answers under its own name; a
model with other files gets a new server and the idle engine is dropped.

On the CPU (serving.keep_engines: always, meant for tests: vLLM's CPU backend cannot sleep, so
a kept engine would hold all its memory), the engine was started with the model's weights and
takes the same weights again: greedy answers are compared."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from appliance.installer.selftest import kept_engine

from appliance.config import ApplianceSettings
from appliance_dev.stack import (
    free_port,
    local_cluster_settings,
    run_cli,
    running_gateway,
    running_local_cluster,
    running_standby,
    write_config,
)

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory):
    """A one-node cluster of its own (a kept engine serves jobs of its node), its standby with
    kept engines on, a gateway; the tiny model imported twice, and once with other files."""
    tmp = tmp_path_factory.mktemp("kept")
    catalog = tmp / "catalog.yaml"
    catalog.write_text("models: []\n")
    settings = local_cluster_settings(
        tmp / "state",
        gateway={"port": free_port(), "health_interval_s": 1.0, "start_timeout_s": 240},
        catalog={"files": [str(catalog)], "include_presets": False},
        serving={"standby": True, "keep_engines": "always", "keep_engine_s": 600},
    )
    other = tmp / "tiny-other-files"
    shutil.copytree(tiny_model_dir, other)
    config_json = other / "generation_config.json"
    config_json.write_text(config_json.read_text().replace("{", '{"top_k": 5,', 1))
    config = write_config(settings, tmp / "config.yaml")
    for name, source in (("tiny-a", tiny_model_dir), ("tiny-b", tiny_model_dir), ("tiny-c", other)):
        out = run_cli(
            config, "models", "import", str(source), "--name", name, "--max-model-len", "512"
        )
        assert out.returncode == 0, out.stderr
    with (
        running_local_cluster(settings),
        running_standby(settings, "n1"),
        running_gateway(settings) as url,
    ):
        try:
            yield settings, url
        finally:
            for inst in instances(url):
                with contextlib.suppress(httpx.HTTPError):
                    stop(url, inst)


def instances(url: str) -> list[dict]:
    return httpx.get(url + "/admin/instances", timeout=10).json()["instances"]


def stop(url: str, inst: dict) -> None:
    httpx.post(f"{url}/admin/instances/{inst['job_id']}/stop", timeout=60).raise_for_status()
    deadline = time.monotonic() + 120
    while any(i["job_id"] == inst["job_id"] for i in instances(url)):
        assert time.monotonic() < deadline, f"instance {inst['job_id']} did not stop"
        time.sleep(0.3)


def ask(url: str, model: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0
    )


def log_of(settings: ApplianceSettings, inst: dict) -> str:
    return (settings.log_dir / f"instance-{inst['model']}-{inst['job_id']}.log").read_text()


def test_the_next_job_of_the_same_files_takes_the_kept_engine_under_its_own_name(stack):
    settings, url = stack
    first_answer = ask(url, "tiny-a")
    assert first_answer.model == "tiny-a"
    [first] = instances(url)
    assert "server started by the standby" in log_of(settings, first)
    stop(url, first)

    answer = ask(url, "tiny-b")
    assert answer.model == "tiny-b" and answer.choices[0].message.content
    # The same weights, loaded into the running engine: greedy decoding answers alike.
    assert answer.choices[0].message.content == first_answer.choices[0].message.content
    [second] = instances(url)
    text = log_of(settings, second)
    assert "took the engine kept" in text, text[-3000:]
    assert second["job_id"] != first["job_id"] and second["url"] == first["url"]
    phases = second["phases"]
    assert phases["job_started_at"] <= phases["weights_loaded_at"] <= phases["ready_at"]
    # The engine now answers as tiny-b only.
    models = httpx.get(f"{second['url']}/v1/models", timeout=30, verify=False).json()
    assert [m["id"] for m in models["data"]] == ["tiny-b"]
    stop(url, second)

    # Other files (a generation config of its own): a new server; the idle engine is dropped.
    assert ask(url, "tiny-c").model == "tiny-c"
    [third] = instances(url)
    assert "server started by the standby" in log_of(settings, third)
    standby_log = (settings.state_dir / "standby-n1.log").read_text()
    assert "dropped: its GPUs are wanted" in standby_log


def test_the_installer_s_self_test_takes_the_kept_engine_and_answers_alike(stack):
    settings, url = stack
    for inst in instances(url):
        stop(url, inst)
    with httpx.Client(base_url=url, timeout=300) as client:
        detail = kept_engine(settings, client, "tiny-a")
    assert "took the kept engine" in detail, detail
