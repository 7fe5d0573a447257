"""The shipped alert rules and dashboard queries checked by promtool, the GPU metrics linted by it,
and metric names read out of PromQL (tests/promtool.py; a real scrape: test_monitoring_scrape)."""

from __future__ import annotations

import pytest

from tests.promtool import (
    RULE_FILES,
    check_rules,
    dashboard_queries,
    dashboards_as_rules,
    family_of,
    gpu_exposition,
    lint_metrics,
    metric_names,
)


def test_shipped_alert_rules_pass_promtool_check_rules():
    assert RULE_FILES, "no rules file under monitoring/prometheus/"
    done = check_rules(*RULE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_parse_with_prometheus_own_parser(tmp_path):
    assert dashboard_queries(), "no dashboard queries under monitoring/grafana/"
    done = check_rules(dashboards_as_rules(tmp_path / "dashboards.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    # The two checks above pass only if promtool really reads the queries it is given.
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: rate(x[5m)\n")
    done = check_rules(bad)
    assert done.returncode != 0 and "parse error" in done.stdout + done.stderr


def test_gpu_metrics_pass_promtool_check_metrics():
    # A CPU machine's scrape has no GPU metrics: lint the gpu collector's from a real capture.
    exposition = gpu_exposition()
    assert "DCGM_FI_DEV_FB_USED{" in exposition and "appliance_gpu_healthy{" in exposition
    assert lint_metrics(exposition) == []


def test_lint_findings_outside_the_exceptions_are_reported():
    exposition = "# HELP tokens Tokens.\n# TYPE tokens counter\ntokens 1\nvllm:x_total 2\n"
    # vllm:x_total's ":" is an excepted finding (vLLM's names); its missing help text is not.
    assert sorted(lint_metrics(exposition)) == [
        'tokens counter metrics should have "_total" suffix',
        "vllm:x_total no help text",
    ]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le, model) "
            "(rate(appliance_request_duration_seconds_bucket[5m])))",
            {"appliance_request_duration_seconds_bucket"},
        ),
        (
            '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))',
            {"node_cpu_seconds_total"},
        ),
        ("vllm:kv_cache_usage_perc > 0.95", {"vllm:kv_cache_usage_perc"}),
        ("a / on(job) group_left(node) b offset 1h30m", {"a", "b"}),
        ('count(up{job="x}, y"}) by (job) > bool 1e3', {"up"}),
        ("max_over_time(z[5m:1m]) unless sum without (gpu) (w)", {"z", "w"}),
        ("sum(rate(c_total[5m])) / sum(rate(c_total[5m] @ end()))", {"c_total"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr, names):
    assert metric_names(expr) == names


def test_histogram_series_belong_to_their_family():
    families = {"h_seconds": "histogram", "c_total": "counter", "g_count": "gauge", "g": "gauge"}
    assert family_of("h_seconds_bucket", families) == "h_seconds"
    assert family_of("h_seconds_count", families) == "h_seconds"
    assert family_of("c_total", families) == "c_total"
    assert family_of("g_count", families) == "g_count"
    assert family_of("g_sum", families) is None  # a gauge has no _sum series
    assert family_of("missing", families) is None
