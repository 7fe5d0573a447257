"""Turns a model's needs into a Slurm request: CPUs, memory, GPUs or GPU shards."""

from __future__ import annotations

import math
from dataclasses import dataclass

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec


@dataclass(frozen=True)
class InstanceRequest:
    """What one instance asks Slurm for, and the vLLM GPU memory fraction that goes with it."""

    cpus: int
    mem_mb: int
    gres: str | None
    gpu_memory_utilization: float | None

    @property
    def uses_gpu(self) -> bool:
        return self.gres is not None


def plan_request(
    spec: ModelSpec, settings: ApplianceSettings, cluster_gpus: int
) -> InstanceRequest:
    """Decide the request; `cluster_gpus` is the most GPUs any node offers (0: CPU-only cluster)."""
    res = spec.resources
    mem_mb = math.ceil(res.memory_gb * 1024)
    if res.gpus == 0:
        return InstanceRequest(res.cpus, mem_mb, None, None)
    if cluster_gpus == 0:
        if res.cpu_fallback:
            return InstanceRequest(res.cpus, mem_mb, None, None)
        raise ApplianceError(
            f"model {spec.name} needs {res.gpus} GPU(s) and the cluster has none "
            "(set resources.cpu_fallback: true in its catalog entry to allow CPU)"
        )
    if res.gpus > cluster_gpus:
        raise ApplianceError(
            f"model {spec.name} needs {res.gpus} GPUs on one node; the largest node has "
            f"{cluster_gpus}"
        )
    gpu_mem = settings.serving.gpu_memory_gb
    shards = settings.cluster.shards_per_gpu
    share = res.gpu_memory_gb / gpu_mem if res.gpu_memory_gb else 1.0
    if res.gpus == 1 and shards > 0 and share <= 0.5:
        # A small model: take a proportional number of shards of one GPU and tell vLLM to keep
        # to the same fraction of its memory, so the models sharing the GPU all fit.
        count = max(1, math.ceil(share * shards))
        return InstanceRequest(res.cpus, mem_mb, f"shard:{count}", round(count / shards * 0.9, 3))
    return InstanceRequest(res.cpus, mem_mb, f"gpu:{res.gpus}", 0.9)
