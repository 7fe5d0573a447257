"""Collectors' metrics from captured real Slurm output and this host, parsed back with
prometheus_client; the monitor keeps going when a collector fails; history and alerts."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from appliance.monitoring.alerts import RULES, active_alerts, rules_yaml
from appliance.monitoring.files import shipped_files
from appliance.monitoring.history import History, rate
from appliance.monitoring.monitor import Monitor, Source
from appliance.monitoring.prometheus_history import PrometheusHistory, selector
from appliance.monitoring.slurm_metrics import slurm_families
from appliance.monitoring.system_metrics import system_families
from appliance.monitoring.training_metrics import training_families
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from appliance.slurm.records import parse_sinfo_json, parse_squeue_json

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
        assert path.read_text() == text, f"{path}: run python -m appliance.monitoring.files"
    shipped = rules_yaml()
    assert all(r.name in shipped for r in RULES)
    assert "{{ $labels.node }}" in shipped and "{{ $value }}" in shipped
    rules = yaml.safe_load(shipped)["groups"][0]["rules"]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in rules)
    for level in ("component", "node", "cluster", "task"):
        board = json.loads((GOLDEN.parent / "grafana" / f"appliance-{level}.json").read_text())
        assert board["panels"] and all(p["targets"] for p in board["panels"])


def test_training_progress_files_become_metrics_with_an_eta(tmp_path):
    run = tmp_path / "lora-1"
    run.mkdir()
    progress = {
        "job_id": 7,
        "model": "tiny-chat",
        "user": "alice",
        "step": 25,
        "total_steps": 100,
        "loss": 1.5,
        "learning_rate": 2e-4,
        "tokens_per_s": 900.0,
        "started_at": 1000.0,
        "updated_at": 1050.0,
        "state": "running",
    }
    (run / "progress.json").write_text(json.dumps(progress))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "progress.json").write_text("{half")
    monitor = Monitor([Source("training", "task", lambda: training_families(tmp_path))])
    monitor.refresh(force=True)
    families = parse(monitor)
    assert families["appliance_training_loss"].samples[0].value == 1.5
    assert families["appliance_training_eta_seconds"].samples[0].value == 150.0  # 75 steps at 2/s
    assert families["appliance_training_step"].samples[0].labels["run"] == "lora-1"


def test_history_from_prometheus_uses_range_queries():
    asked = {}

    class Answer:
        def raise_for_status(self):
            pass

        def json(self):
            return {
                "status": "success",
                "data": {
                    "resultType": "matrix",
                    "result": [
                        {
                            "metric": {"__name__": "vllm:num_requests_running", "job_id": "3"},
                            "values": [[1700000000, "1"], [1700000015, "2"]],
                        }
                    ],
                },
            }

    def get(url, params):
        asked.update(url=url, **params)
        return Answer()

    history = PrometheusHistory("http://prom:9090/", get=get)
    (series,) = history.query("vllm:num_requests_running", since=0, job_id="3")
    assert asked["url"] == "http://prom:9090/api/v1/query_range"
    assert asked["query"] == 'vllm:num_requests_running{job_id="3"}'
    assert series.labels == {"job_id": "3"} and series.points == [(1.7e9, 1.0), (1.7e9 + 15, 2.0)]
    assert selector("up", {"a": 'x"y'}) == 'up{a="x\\"y"}'
