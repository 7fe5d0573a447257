"""Collectors' metrics from captured real Slurm output and this host, parsed back with
prometheus_client; the monitor keeps going when a collector fails; history and alerts."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from appliance.slurm.records import parse_sinfo_json, parse_squeue_json
from monitoring.alerts import RULES, active_alerts, rules_yaml
from monitoring.files import shipped_files
from monitoring.history import History, rate
from monitoring.monitor import Monitor, Source
from monitoring.slurm_metrics import slurm_families
from monitoring.system_metrics import system_families

SLURM = Path(__file__).parent / "testdata" / "slurm"
GOLDEN = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"


def parse(monitor: Monitor) -> dict:
    return {f.name: f for f in text_string_to_metric_families(monitor.render().decode())}


def test_slurm_metrics_from_captured_output():
    nodes = parse_sinfo_json((SLURM / "sinfo_busy.stdout").read_text())
    jobs = parse_squeue_json((SLURM / "squeue_mixed.stdout").read_text())
    monitor = Monitor([Source("slurm", "cluster", lambda: slurm_families(nodes, jobs))])
    monitor.refresh(force=True)
    families = parse(monitor)
    assert families["slurm_nodes_total"].samples[0].value == len(nodes)
    info = {s.labels["node"]: s.labels for s in families["slurm_node_info"].samples}
    assert set(info) == {n.name for n in nodes}
    assert families["slurm_cpus_alloc"].samples[0].value == sum(n.alloc_cpus for n in nodes)
    pending = sum(1 for j in jobs if j.state == "PENDING")
    assert families["slurm_queue_pending"].samples[0].value == pending
    assert len(families["slurm_job_info"].samples) == len(jobs)


def test_a_failing_collector_is_reported_and_the_others_still_work():
    def broken():
        raise RuntimeError("sinfo: cannot reach slurmctld")

    monitor = Monitor(
        [Source("system", "component", system_families), Source("slurm", "cluster", broken)]
    )
    monitor.refresh(force=True)
    families = parse(monitor)
    up = {s.labels["collector"]: s.value for s in families["appliance_collector_up"].samples}
    assert up == {"system": 1.0, "slurm": 0.0}
    assert "node_memory_MemTotal_bytes" in families
    status = {s["collector"]: s for s in monitor.status()}
    assert "cannot reach slurmctld" in status["slurm"]["error"]
    alerts = active_alerts(monitor.collect())
    assert [a.rule for a in alerts] == ["ApplianceCollectorDown"]
    assert alerts[0].summary == "Collector slurm (cluster) is not working"


def test_history_is_bounded_and_queryable():
    history = History(points=3, max_series=2)
    for t in range(5):
        fam = GaugeMetricFamily("load", "x", labels=["node"])
        fam.add_metric(["n1"], t * 10)
        fam.add_metric(["n2"], 1)
        fam.add_metric(["n3"], 2)
        history.record(float(t), [fam])
    (n1,) = history.query("load", node="n1")
    assert n1.points == [(2.0, 20.0), (3.0, 30.0), (4.0, 40.0)]
    assert len(history) == 2 and history.dropped_series == 5
    assert rate([(0, 5), (2, 9), (3, 1)]) == [(2, 2.0), (3, 1.0)]


def test_shipped_rules_and_dashboards_are_generated_from_their_sources():
    for path, text in shipped_files().items():
        assert path.read_text() == text, f"{path}: run python -m monitoring.files"
    shipped = rules_yaml()
    assert all(r.name in shipped for r in RULES)
    assert "{{ $labels.node }}" in shipped and "{{ $value }}" in shipped
    rules = yaml.safe_load(shipped)["groups"][0]["rules"]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in rules)
    for level in ("component", "node", "cluster", "task"):
        board = json.loads((GOLDEN.parent / "grafana" / f"appliance-{level}.json").read_text())
        assert board["panels"] and all(p["targets"] for p in board["panels"])
