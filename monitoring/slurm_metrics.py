"""The Slurm cluster as Prometheus metrics: nodes and their states, CPU, memory and GPU
allocation per node and partition, and the queue with pending reasons. Names follow the
community Slurm exporters (`slurm_nodes_*`, `slurm_cpus_*`, `slurm_queue_*`)."""

from __future__ import annotations

import re
from collections import Counter

from prometheus_client.core import GaugeMetricFamily, Metric

from appliance.slurm.records import SlurmJob, SlurmNode

NODE_STATES = ("alloc", "comp", "down", "drain", "fail", "idle", "maint", "mix", "resv")
_GRES_COUNT = re.compile(r"(gpu|shard)(?::[^:,()]+)?:(\d+)")


def _gres(text: str, kind: str) -> int:
    return sum(int(n) for k, n in _GRES_COUNT.findall(text) if k == kind)


def node_state_group(node: SlurmNode) -> str:
    """The one state a node is counted under (drain wins over what it runs)."""
    if node.drained:
        return "drain"
    base = node.base_state
    for state in NODE_STATES:
        if base.startswith(state):
            return state
    return "down" if "not_responding" in node.flags else base


def slurm_families(nodes: list[SlurmNode], jobs: list[SlurmJob]) -> list[Metric]:
    out: list[Metric] = []
    groups = Counter(node_state_group(n) for n in nodes)
    for state in NODE_STATES:
        doc = f"Nodes in state {state} (a drained node counts under drain only)."
        out.append(GaugeMetricFamily(f"slurm_nodes_{state}", doc, groups[state]))
    out.append(GaugeMetricFamily("slurm_nodes_total", "Nodes in the cluster.", len(nodes)))

    labels = ["node", "state", "partition", "reason"]
    node_info = GaugeMetricFamily("slurm_node_info", "Each node's state (value 1).", labels=labels)
    per_node = {
        "slurm_node_cpus_total": ("CPUs of the node.", lambda n: n.cpus),
        "slurm_node_cpus_alloc": ("CPUs allocated on the node.", lambda n: n.alloc_cpus),
        "slurm_node_memory_total_bytes": (
            "Memory of the node.",
            lambda n: n.real_memory_mb * 2**20,
        ),
        "slurm_node_memory_alloc_bytes": (
            "Memory allocated on the node.",
            lambda n: n.alloc_memory_mb * 2**20,
        ),
        "slurm_node_gpus_total": ("GPUs of the node.", lambda n: _gres(n.gres, "gpu")),
        "slurm_node_gpus_alloc": (
            "GPUs allocated on the node.",
            lambda n: _gres(n.gres_used, "gpu"),
        ),
        "slurm_node_cpu_load": ("Load average slurmd reports.", lambda n: n.cpu_load),
    }
    families = {
        name: GaugeMetricFamily(name, doc, labels=["node"]) for name, (doc, _) in per_node.items()
    }
    for n in nodes:
        partition = ",".join(n.partitions)
        node_info.add_metric([n.name, n.state, partition, n.reason], 1)
        for name, (_, value_of) in per_node.items():
            value = value_of(n)
            if value is not None:
                families[name].add_metric([n.name], value)
    out += [node_info, *families.values()]

    totals = {
        "slurm_cpus_total": ("CPUs in the cluster.", sum(n.cpus for n in nodes)),
        "slurm_cpus_alloc": ("CPUs allocated in the cluster.", sum(n.alloc_cpus for n in nodes)),
        "slurm_gpus_total": ("GPUs in the cluster.", sum(_gres(n.gres, "gpu") for n in nodes)),
        "slurm_gpus_alloc": (
            "GPUs allocated in the cluster.",
            sum(_gres(n.gres_used, "gpu") for n in nodes),
        ),
    }
    for name, (doc, value) in totals.items():
        out.append(GaugeMetricFamily(name, doc, value))
    partitions = GaugeMetricFamily(
        "slurm_partition_cpus_alloc", "CPUs allocated per partition.", labels=["partition"]
    )
    by_partition: Counter[str] = Counter()
    for n in nodes:
        for p in n.partitions:
            by_partition[p] += n.alloc_cpus
    for p, value in sorted(by_partition.items()):
        partitions.add_metric([p], value)
    out.append(partitions)

    states = Counter(j.state.lower() for j in jobs)
    for state in ("pending", "running", "completing", "suspended"):
        out.append(GaugeMetricFamily(f"slurm_queue_{state}", f"Jobs {state}.", states[state]))
    reasons = GaugeMetricFamily(
        "slurm_queue_pending_reason", "Pending jobs by reason.", labels=["reason"]
    )
    for reason, count in sorted(Counter(j.reason for j in jobs if j.state == "PENDING").items()):
        reasons.add_metric([reason or "None"], count)
    out.append(reasons)
    job_info = GaugeMetricFamily(
        "slurm_job_info",
        "Each job's state and reason (value 1).",
        labels=["job_id", "name", "state", "reason", "nodes", "exit_code"],
    )
    for j in jobs:
        exit_code = "" if j.exit_code is None else str(j.exit_code)
        nodes_text = ",".join(j.nodes)
        job_info.add_metric([str(j.job_id), j.name, j.state, j.reason, nodes_text, exit_code], 1)
    out.append(job_info)
    return out
