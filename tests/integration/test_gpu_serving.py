"""The product path on a real GPU (marker gpu; run on the GPU machine, docs/gpu.md): a real-size
model with random weights, imported encrypted into the store, started by the first request as a
Slurm job on the GPU's GRES, loaded through the store's vLLM plugin with GPU decryption, and
answered through the gateway to the official openai client: chat, streamed chat, completions and
embeddings. NVML sees the instance's process. APPLIANCE_GPU_WORK keeps the model and the store
between runs (the benchmark uses the same); APPLIANCE_GPU_PRESET picks the architecture."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from benchmarks.gpu_serving import (
    cuda_available,
    instance_log,
    instances,
    part_setup,
    running_stack,
    set_tier,
    stack_settings,
    stop_instances,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slurm,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU"),
]

PRESET = os.environ.get("APPLIANCE_GPU_PRESET", "llama-3.1-8b-instruct")
EMBEDDING = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = Path(os.environ.get("APPLIANCE_GPU_WORK") or tmp_path_factory.mktemp("gpu"))
    args = type("Args", (), {"work": work, "preset": PRESET, "max_model_len": 8192})()
    part_setup(args, {})
    settings = stack_settings(work, PRESET)
    with running_stack(settings) as (url, store_url):
        # From the store itself, not the host tier: the path that decrypts on the GPU.
        httpx.delete(f"{store_url}/models/{PRESET}/cache", timeout=60)
        yield settings, url, store_url


@pytest.fixture(scope="module")
def client(stack):
    _, url, _ = stack
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=900, max_retries=0)


def test_chat_from_a_stopped_model_starts_a_gpu_instance(stack, client):
    settings, url, _ = stack
    reply = client.chat.completions.create(
        model=PRESET, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    [inst] = [i for i in instances(url) if i["model"] == PRESET]
    endpoint = json.loads((settings.instances_dir / f"{inst['job_id']}.json").read_text())
    # The launcher's CUDA branch: Slurm gave the job the GPU and vLLM runs on it.
    assert endpoint["device"] == "cuda" and endpoint["gpus"] == "0", endpoint
    squeue = subprocess.run(
        ["squeue", "-h", "-j", str(inst["job_id"]), "-o", "%b"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SLURM_CONF": str(settings.slurm_conf)},
    )
    assert "gpu" in squeue.stdout, squeue
    log = instance_log(settings, inst)
    assert f"appliance-store: loaded {PRESET} from the store" in log, log[-3000:]
    peak = float(re.findall(r"load_peak_gpu_bytes_over_model=([\d.]+)", log)[0])
    assert peak <= 1.1, peak


def test_streamed_chat_and_completions(client):
    stream = client.chat.completions.create(
        model=PRESET,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0
    done = client.completions.create(model=PRESET, prompt="Once upon a time", max_tokens=8)
    assert done.choices[0].text and done.usage.completion_tokens > 0


def test_embeddings(client):
    out = client.embeddings.create(model=EMBEDDING, input=["a cat", "a dog"])
    assert [len(d.embedding) for d in out.data] == [384, 384]


def test_nvml_sees_the_instance_process(stack):
    import pynvml

    settings, url, _ = stack
    [inst] = [i for i in instances(url) if i["model"] == PRESET]
    endpoint = json.loads((settings.instances_dir / f"{inst['job_id']}.json").read_text())
    family = {endpoint["pid"], *(p.pid for p in psutil.Process(endpoint["pid"]).children(True))}
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    finally:
        pynvml.nvmlShutdown()
    ours = [p for p in procs if p.pid in family]
    model_bytes = sum(f.stat().st_size for f in Path(settings.store_root, PRESET).glob("*.bin"))
    assert ours and ours[0].usedGpuMemory > model_bytes, (procs, family)


def test_a_restart_loads_from_the_host_tier(stack, client):
    settings, url, store_url = stack
    stop_instances(url)
    set_tier(store_url, PRESET, "host")
    reply = client.completions.create(model=PRESET, prompt="Hi", max_tokens=4)
    assert reply.usage.completion_tokens > 0
    [inst] = [i for i in instances(url) if i["model"] == PRESET]
    assert f"loaded {PRESET} from the host tier" in instance_log(settings, inst)


def gpu_used_bytes() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
    finally:
        pynvml.nvmlShutdown()


def test_a_parked_instance_frees_its_gpu_memory_and_a_request_wakes_it(stack, client):
    """vLLM's sleep mode on CUDA, through the gateway: the instance keeps its job, gives back
    at least its weights' worth of GPU memory, and answers the next request after waking."""
    settings, url, _ = stack
    client.completions.create(model=PRESET, prompt="Hi", max_tokens=2)
    [inst] = [i for i in instances(url) if i["model"] == PRESET and i["state"] == "ready"]
    assert inst["can_sleep"], "a GPU instance starts with vLLM's sleep mode"
    awake = gpu_used_bytes()
    r = httpx.post(f"{url}/admin/instances/{inst['job_id']}/park", timeout=600)
    assert r.status_code == 200, r.text
    model_bytes = sum(f.stat().st_size for f in Path(settings.store_root, PRESET).glob("*.bin"))
    assert awake - gpu_used_bytes() > model_bytes
    reply = client.completions.create(model=PRESET, prompt="Hi", max_tokens=4)
    assert reply.usage.completion_tokens > 0
    [woken] = [i for i in instances(url) if i["model"] == PRESET]
    assert woken["job_id"] == inst["job_id"] and woken["state"] == "ready"
