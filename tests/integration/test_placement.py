"""Placement by Slurm: GPU instances spread over simulated GPU nodes through GRES, next to
ordinary batch work, and a request beyond capacity waits for resources."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from appliance.config import load_settings
from appliance.serving.endpoint import read_endpoint
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import free_port, running_gateway

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(slurm_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("place")
    # Takes both simulated GPUs of a node, so two instances can only run on different nodes.
    (tmp / "catalog.yaml").write_text(
        "models:\n  - name: tiny-gpu\n"
        f"    source: dir:{tiny_model_dir}\n    max_model_len: 512\n"
        "    resources: {gpus: 2, gpu_memory_gb: 160, cpus: 1, memory_gb: 3}\n"
        "    max_instances: 3\n"
    )
    base = slurm_cluster.model_dump(mode="json")
    base["gateway"].update(port=free_port(), health_interval_s=1.0, idle_timeout_s=0)
    base["catalog"] = {"files": [str(tmp / "catalog.yaml")], "include_presets": False}
    settings = load_settings(**base)
    with running_gateway(settings) as url:
        yield settings, url


def test_gpu_instances_are_placed_by_gres_beside_batch_jobs(stack):
    settings, url = stack
    slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
    batch = slurm.submit(
        "#!/bin/bash\n#SBATCH --job-name=ordinary-batch\n#SBATCH --output=/dev/null\n"
        "#SBATCH --cpus-per-task=1\n#SBATCH --mem=100M\nsleep 600\n"
    )
    try:
        jobs = [
            httpx.post(f"{url}/admin/models/tiny-gpu/start", timeout=30).json()["job_id"]
            for _ in range(3)
        ]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            insts = {
                i["job_id"]: i
                for i in httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
            }
            if sum(insts[j]["state"] == "ready" for j in jobs if j in insts) == 2:
                break
            time.sleep(1)
        ready = [insts[j] for j in jobs if insts[j]["state"] == "ready"]
        waiting = [insts[j] for j in jobs if insts[j]["state"] == "pending"]
        assert len(ready) == 2, insts
        # Each node has two GPUs and each instance wants two: one instance per node.
        assert sorted(i["node"] for i in ready) == ["n1", "n2"]
        for inst in ready:
            endpoint = read_endpoint(settings.instances_dir, inst["job_id"])
            assert sorted(endpoint.gpus.split(",")) == ["0", "1"]  # CUDA_VISIBLE_DEVICES
        # The third waits for GPUs, and says so.
        assert len(waiting) == 1 and waiting[0]["reason"] in ("Resources", "Priority")
        # Ordinary batch work runs beside the instances.
        assert slurm.job(batch).state == "RUNNING"
        # Requests are spread over both instances (least loaded first).
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=120, max_retries=0)
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda _: client.completions.create(
                        model="tiny-gpu", prompt="Hello", max_tokens=32
                    ),
                    range(8),
                )
            )
        served = {
            i["job_id"]: i["served"]
            for i in httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
        }
        assert all(served[i["job_id"]] > 0 for i in ready), served
    finally:
        slurm.cancel(batch)
