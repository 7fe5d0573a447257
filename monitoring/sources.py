"""The gateway's collectors, one per kind of thing watched, at their levels: this host's
components (CPU, memory, disks, network, GPUs), the nodes' health and the cluster (Slurm), the
serving instances (vLLM), and the gateway's requests (live)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

import httpx
from appliance.monitoring.gpu_metrics import gpu_families
from appliance.monitoring.health import REASON_PREFIX
from appliance.monitoring.monitor import Source
from appliance.monitoring.nvml import NvmlReader, NvmlUnavailable
from appliance.monitoring.slurm_metrics import slurm_families
from appliance.monitoring.system_metrics import system_families
from appliance.monitoring.training_metrics import training_families
from appliance.monitoring.vllm_metrics import Target, scrape
from prometheus_client.core import GaugeMetricFamily, Metric

from appliance.config import ApplianceSettings
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import SlurmJob, SlurmNode

# An instance's /metrics answers in milliseconds; one that hangs must not stall the others.
SCRAPE_TIMEOUT_S = 2.0


class GpuSource:
    """NVML opened once; when it cannot be, every reading says why (the collector is down)."""

    def __init__(self, reader_factory: Callable[[], NvmlReader] = NvmlReader):
        self._factory = reader_factory
        self._reader: NvmlReader | None = None
        self._unavailable: str | None = None
        self.hostname = socket.gethostname()

    def read(self) -> list[Metric]:
        if self._unavailable:
            raise NvmlUnavailable(self._unavailable)
        if self._reader is None:
            try:
                self._reader = self._factory().open()
            except NvmlUnavailable as exc:
                self._unavailable = str(exc)
                raise
        return gpu_families(self._reader.read(), self.hostname)


class SlurmSnapshot:
    """The latest sinfo and squeue answers; the cluster and node collectors share them."""

    def __init__(self, client: SlurmClient):
        self.client = client
        self.nodes: list[SlurmNode] = []
        self.jobs: list[SlurmJob] = []
        self._lock = threading.Lock()

    def refresh(self) -> list[Metric]:
        nodes, jobs = self.client.nodes(), self.client.jobs()
        with self._lock:
            self.nodes, self.jobs = nodes, jobs
        return slurm_families(nodes, jobs)

    def node_health(self) -> list[Metric]:
        with self._lock:
            nodes = list(self.nodes)
        healthy = GaugeMetricFamily(
            "appliance_node_healthy",
            "1 unless the node's health check drained it or Slurm lost it.",
            labels=["node"],
        )
        for n in nodes:
            bad = (n.drained and n.reason.startswith(REASON_PREFIX)) or n.base_state in (
                "down",
                "fail",
            )
            healthy.add_metric([n.name], 0 if bad else 1)
        return [healthy]


def gateway_sources(
    settings: ApplianceSettings,
    slurm: SlurmClient,
    targets: Callable[[], list[Target]],
    verify: ssl.SSLContext | bool = True,
) -> list[Source]:
    """The gateway's collectors; instances are scraped verifying their TLS with `verify`."""
    mon = settings.monitoring
    snapshot = SlurmSnapshot(slurm)
    gpu = GpuSource()
    # Lives as long as the gateway's monitor (the process).
    client = httpx.Client(timeout=SCRAPE_TIMEOUT_S, verify=verify)

    def instances() -> list[Metric]:
        families, problems = scrape(targets(), client)
        if problems and not families:
            raise RuntimeError("; ".join(problems))
        return families

    sources = [
        Source("system", "component", system_families, mon.interval_s),
        Source("gpu", "component", gpu.read, mon.interval_s),
        Source("slurm", "cluster", snapshot.refresh, mon.cluster_interval_s),
        Source("node_health", "node", snapshot.node_health, mon.cluster_interval_s),
        Source("instances", "task", instances, mon.task_interval_s),
        Source(
            "training",
            "task",
            lambda: training_families(settings.training_dir),
            mon.task_interval_s,
        ),
    ]
    return sources
