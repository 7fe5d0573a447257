"""The Monitoring tab's handlers without a browser: alerts, drill-down to a node, the chosen
level's plots, recent requests and search."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from appliance.webapp import monitoring_view as mon
from tests.unit.webapp_fakes import ADMIN, REFUSED, USER, FakeClient, context, given, run

STATUS = {
    "alerts": [{"severity": "critical", "summary": "node n2 is down", "rule": "node_down"}],
    "collectors": [{"collector": "dcgm", "level": "component", "up": False, "error": "no GPU"}],
}
RECENT = [
    {"id": "r1", "user": "bob", "model": "m", "job_id": None, "node": None, "status": "ok"}
    | {"duration_s": 1.2345, "completion_tokens": 7}
]


def series(token, name, since_s, **labels):
    if name == "appliance_node_healthy":
        return [{"labels": {"node": "n2"}, "points": []}, {"labels": {"node": "n1"}, "points": []}]
    node = labels.get("node", "all")
    return [{"labels": {"node": node}, "points": [[1_700_000_000, 3.0]]}]


def test_refresh_draws_the_chosen_level_for_the_first_node():
    client = FakeClient(monitoring_status=STATUS, series=series, recent_requests=RECENT)
    alerts, nodes, rows, *rest = run(mon.refresh(context(client), ADMIN, "Node", None, 900))
    columns, plots = rest[: len(mon.PLOTS)], rest[len(mon.PLOTS) :]
    assert "🔴 node n2 is down (node_down)" in alerts and "**dcgm** (component): no GPU" in alerts
    assert given(nodes) == {"choices": ["n1", "n2"], "value": "n1"}
    assert rows == [["r1", "bob", "m", "", "", "ok", 1.23, 7]]
    assert [given(c)["visible"] for c in columns] == [False, True, False, False]
    drawn = [p for p in plots if isinstance(p, pd.DataFrame)]
    assert len(drawn) == len(mon.PLOTS["Node"])
    assert list(drawn[0]["series"]) == ["slurm_node_cpus_alloc node=n1"]


def test_refresh_is_for_administrators_and_says_when_monitoring_is_down():
    skip_all = run(mon.refresh(context(FakeClient()), USER, "Cluster", None, 900))
    assert len(skip_all) == 3 + len(mon.PLOTS) + 16 and set(map(str, skip_all)) == {str(gr.skip())}
    down = run(
        mon.refresh(context(FakeClient(monitoring_status=REFUSED)), ADMIN, "Cluster", None, 9)
    )
    assert down[0] == "Monitoring is not available: not allowed"


def test_search_shows_the_topology_with_faults():
    found = {
        "query": "12",
        "matches": [{"kind": "job"}],
        "faults": [{"label": "node n2"}],
        "topology": {
            "nodes": [
                {"id": "j", "kind": "job", "label": "12", "status": "ok"},
                {"id": "n", "kind": "node", "label": "n2", "status": "fault"},
            ],
            "edges": [["j", "n"]],
        },
    }
    client = FakeClient(search=found)
    shown = run(mon.find(context(client), ADMIN, " 12 "))
    assert shown.startswith("**1 match(es)** for `12`; **1 fault(s)**: node n2")
    assert "  - ⚠️ **node**: n2" in shown
    assert client.called("search") == [("t-alice", "12")]
    assert run(mon.find(context(client), ADMIN, "  ")) == ""
