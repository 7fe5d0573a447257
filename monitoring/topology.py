"""Global search and a task's full-link topology: a job id, model, node, user or request id
finds every related resource, laid out as request -> instance (Slurm job) -> node -> CPUs and
GPUs -> health, with faults marked."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import Metric


def _samples(families: Iterable[Metric], name: str) -> list:
    return [s for f in families for s in f.samples if s.name == name]


class Graph:
    """Nodes (id, kind, label, status) and edges, without duplicates."""

    def __init__(self):
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, node_id: str, kind: str, label: str, status: str = "ok", **detail) -> str:
        if node_id not in self.nodes or status == "fault":
            self.nodes[node_id] = {
                "id": node_id,
                "kind": kind,
                "label": label,
                "status": status,
                **detail,
            }
        return node_id

    def link(self, a: str, b: str) -> None:
        if (a, b) not in self.edges:
            self.edges.append((a, b))


def _add_node(g: Graph, families: list[Metric], node: str) -> str:
    """A Slurm node with its CPUs, GPUs and health."""
    info = next(
        (s for s in _samples(families, "slurm_node_info") if s.labels["node"] == node), None
    )
    healthy = next(
        (s.value for s in _samples(families, "appliance_node_healthy") if s.labels["node"] == node),
        1,
    )
    state = info.labels["state"] if info else "unknown"
    reason = info.labels.get("reason", "") if info else ""
    nid = g.add(
        f"node:{node}", "node", f"{node} ({state})", "ok" if healthy else "fault", reason=reason
    )
    values = {s.name: s.value for f in families for s in f.samples if s.labels.get("node") == node}
    alloc, total = values.get("slurm_node_cpus_alloc", 0), values.get("slurm_node_cpus_total", 0)
    load = values.get("slurm_node_cpu_load", 0)
    cpus = g.add(f"cpu:{node}", "cpu", f"CPUs {alloc:g}/{total:g} allocated, load {load:.2f}")
    g.link(nid, cpus)
    gpus_total = values.get("slurm_node_gpus_total", 0)
    if gpus_total:
        used = values.get("slurm_node_gpus_alloc", 0)
        gid = g.add(f"gpus:{node}", "gpu", f"GPUs {used:g}/{gpus_total:g} allocated")
        g.link(nid, gid)
    for s in _samples(families, "appliance_gpu_healthy"):
        if s.labels.get("Hostname") in (node, info.labels.get("node") if info else None):
            gpu = g.add(
                f"gpu:{node}:{s.labels['gpu']}",
                "gpu",
                f"GPU {s.labels['gpu']} {s.labels.get('modelName', '')}",
                "ok" if s.value else "fault",
            )
            g.link(nid, gpu)
    health = g.add(f"health:{node}", "health", reason or "healthy", "ok" if healthy else "fault")
    g.link(nid, health)
    return nid


def _add_instance(g: Graph, families: list[Metric], inst) -> str:
    d = inst.describe() if hasattr(inst, "describe") else inst
    status = "fault" if d["state"] in ("failed", "unhealthy") else "ok"
    iid = g.add(
        f"job:{d['job_id']}",
        "instance",
        f"job {d['job_id']}: {d['model']} ({d['state']})",
        status,
        in_flight=d.get("inflight", 0),
    )
    if d.get("node"):
        g.link(iid, _add_node(g, families, d["node"]))
    return iid


def search(query: str, families: list[Metric], instances: list, requests: list) -> dict:
    """Every resource `query` names or relates to, and their topology."""
    g = Graph()
    matches: list[dict[str, str]] = []
    by_job = {i.job_id: i for i in instances}

    def add_request(r) -> None:
        rid = g.add(
            f"request:{r.id}",
            "request",
            f"{r.id}: {r.user} -> {r.model} ({r.status or 'running'})",
            "fault" if r.status >= 500 or r.error else "ok",
        )
        if r.job_id in by_job:
            g.link(rid, _add_instance(g, families, by_job[r.job_id]))
        elif r.node:
            g.link(rid, _add_node(g, families, r.node))

    for r in requests:
        if query in (r.id, r.user):
            matches.append({"kind": "request" if query == r.id else "user", "id": r.id})
            add_request(r)
    for inst in instances:
        if query in (str(inst.job_id), inst.model, inst.node):
            matches.append({"kind": "instance", "id": str(inst.job_id)})
            _add_instance(g, families, inst)
    for s in _samples(families, "slurm_job_info"):
        if query == s.labels["job_id"] and int(query) not in by_job:
            matches.append({"kind": "job", "id": query})
            jid = g.add(
                f"job:{query}",
                "job",
                f"job {query}: {s.labels['name']} "
                f"({s.labels['state']} {s.labels['reason']})".strip(),
            )
            for node in filter(None, s.labels["nodes"].split(",")):
                g.link(jid, _add_node(g, families, node))
    for s in _samples(families, "slurm_node_info"):
        if query == s.labels["node"]:
            matches.append({"kind": "node", "id": query})
            _add_node(g, families, query)
    return {
        "query": query,
        "matches": matches,
        "topology": {"nodes": list(g.nodes.values()), "edges": g.edges},
        "faults": [n for n in g.nodes.values() if n["status"] == "fault"],
    }
