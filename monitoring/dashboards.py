"""Grafana dashboards for the four levels (component, node, cluster, task), built from one list
of panels per level; the JSON files in monitoring/grafana/ are generated from here."""

from __future__ import annotations

import json

# level -> (title, [(panel title, unit, [PromQL, ...])])
DASHBOARDS: dict[str, tuple[str, list[tuple[str, str, list[str]]]]] = {
    "component": (
        "Appliance: components (CPU, memory, disks, network, GPUs)",
        [
            (
                "CPU busy",
                "percentunit",
                ['1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))'],
            ),
            ("Memory available", "bytes", ["node_memory_MemAvailable_bytes"]),
            (
                "Filesystem free",
                "percentunit",
                ["node_filesystem_avail_bytes / node_filesystem_size_bytes"],
            ),
            (
                "Network",
                "Bps",
                [
                    "rate(node_network_receive_bytes_total[1m])",
                    "rate(node_network_transmit_bytes_total[1m])",
                ],
            ),
            ("GPU utilisation", "percent", ["DCGM_FI_DEV_GPU_UTIL"]),
            ("GPU memory used", "decmbytes", ["DCGM_FI_DEV_FB_USED"]),
            ("GPU temperature", "celsius", ["DCGM_FI_DEV_GPU_TEMP"]),
            ("GPU power", "watt", ["DCGM_FI_DEV_POWER_USAGE"]),
            ("PCIe link", "none", ["DCGM_FI_DEV_PCIE_LINK_GEN", "DCGM_FI_DEV_PCIE_LINK_WIDTH"]),
            (
                "GPU errors",
                "none",
                [
                    "DCGM_FI_DEV_XID_ERRORS",
                    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
                    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
                ],
            ),
        ],
    ),
    "node": (
        "Appliance: nodes",
        [
            ("Node health (1 healthy)", "none", ["appliance_node_healthy"]),
            ("CPUs allocated", "none", ["slurm_node_cpus_alloc", "slurm_node_cpus_total"]),
            ("Memory allocated", "bytes", ["slurm_node_memory_alloc_bytes"]),
            ("GPUs allocated", "none", ["slurm_node_gpus_alloc", "slurm_node_gpus_total"]),
            ("Load", "none", ["slurm_node_cpu_load"]),
        ],
    ),
    "cluster": (
        "Appliance: cluster (Slurm)",
        [
            (
                "Nodes by state",
                "none",
                [
                    "slurm_nodes_idle",
                    "slurm_nodes_mix",
                    "slurm_nodes_alloc",
                    "slurm_nodes_drain",
                    "slurm_nodes_down",
                ],
            ),
            ("CPUs", "none", ["slurm_cpus_alloc", "slurm_cpus_total"]),
            ("GPUs", "none", ["slurm_gpus_alloc", "slurm_gpus_total"]),
            ("Queue", "none", ["slurm_queue_pending", "slurm_queue_running"]),
            ("Pending reasons", "none", ["slurm_queue_pending_reason"]),
        ],
    ),
    "task": (
        "Appliance: tasks (instances, requests, training)",
        [
            (
                "Requests per second",
                "reqps",
                ["sum by (model) (rate(appliance_requests_total[1m]))"],
            ),
            (
                "Errors per second",
                "reqps",
                ['sum by (model) (rate(appliance_requests_total{status=~"5.."}[1m]))'],
            ),
            (
                "Latency p50 / p99",
                "s",
                [
                    "histogram_quantile(0.5, sum by (le, model) "
                    "(rate(appliance_request_duration_seconds_bucket[5m])))",
                    "histogram_quantile(0.99, sum by (le, model) "
                    "(rate(appliance_request_duration_seconds_bucket[5m])))",
                ],
            ),
            (
                "Tokens per second",
                "none",
                ["sum by (model, kind) (rate(appliance_tokens_total[1m]))"],
            ),
            (
                "Running and waiting (vLLM)",
                "none",
                ["vllm:num_requests_running", "vllm:num_requests_waiting"],
            ),
            ("KV cache used (vLLM)", "percentunit", ["vllm:kv_cache_usage_perc"]),
            (
                "Time to first token p50 (vLLM)",
                "s",
                [
                    "histogram_quantile(0.5, sum by (le, job_id) "
                    "(rate(vllm:time_to_first_token_seconds_bucket[5m])))"
                ],
            ),
            (
                "Inter-token latency p50 (vLLM)",
                "s",
                [
                    "histogram_quantile(0.5, sum by (le, job_id) "
                    "(rate(vllm:inter_token_latency_seconds_bucket[5m])))"
                ],
            ),
        ],
    ),
}


def dashboard(level: str) -> dict:
    title, panels = DASHBOARDS[level]
    return {
        "uid": f"appliance-{level}",
        "title": title,
        "tags": ["appliance", level],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + k), "expr": expr} for k, expr in enumerate(exprs)
                ],
            }
            for i, (panel_title, unit, exprs) in enumerate(panels)
        ],
    }


def dashboard_json(level: str) -> str:
    return json.dumps(dashboard(level), indent=2) + "\n"
