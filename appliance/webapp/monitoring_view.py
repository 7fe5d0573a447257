"""The Monitoring tab (administrators): active alerts and collectors, plots per level over time
(cluster, node, component, task) with drill-down from the cluster to a node and its components,
and global search showing a task's full-link topology with faults marked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, gateway, is_admin, token_of
from monitoring.history import rate

# level -> [(plot title, [(metric, label keys naming the line, transform)])]
Line = tuple[str, tuple[str, ...], str]  # metric, labels shown, "value" | "rate"
PLOTS: dict[str, list[tuple[str, list[Line]]]] = {
    "Cluster": [
        ("CPUs allocated / total", [("slurm_cpus_alloc", (), "value"),
                                    ("slurm_cpus_total", (), "value")]),
        ("GPUs allocated / total", [("slurm_gpus_alloc", (), "value"),
                                    ("slurm_gpus_total", (), "value")]),
        ("Jobs running / pending", [("slurm_queue_running", (), "value"),
                                    ("slurm_queue_pending", (), "value")]),
        ("Nodes drained / down", [("slurm_nodes_drain", (), "value"),
                                  ("slurm_nodes_down", (), "value")]),
    ],
    "Node": [
        ("CPUs allocated", [("slurm_node_cpus_alloc", ("node",), "value")]),
        ("Load", [("slurm_node_cpu_load", ("node",), "value")]),
        ("Healthy (1) or not (0)", [("appliance_node_healthy", ("node",), "value")]),
        ("GPUs allocated", [("slurm_node_gpus_alloc", ("node",), "value")]),
    ],
    "Component": [
        ("CPU busy (share)", [("appliance_cpu_busy_ratio", (), "value")]),
        ("Memory available (GiB)", [("node_memory_MemAvailable_bytes", (), "gib")]),
        ("GPU utilisation (%)", [("DCGM_FI_DEV_GPU_UTIL", ("gpu",), "value")]),
        ("GPU temperature (C)", [("DCGM_FI_DEV_GPU_TEMP", ("gpu",), "value")]),
    ],
    "Task": [
        ("Requests per second", [("appliance_requests_total", ("model", "status"), "rate")]),
        ("Tokens per second", [("appliance_tokens_total", ("model", "kind"), "rate")]),
        ("Running / waiting (vLLM)", [("vllm:num_requests_running", ("job_id",), "value"),
                                      ("vllm:num_requests_waiting", ("job_id",), "value")]),
        ("KV cache used (vLLM)", [("vllm:kv_cache_usage_perc", ("job_id",), "value")]),
    ],
}  # fmt: skip
LEVELS = list(PLOTS)
_TRANSFORMS: dict[str, Callable[[list], list]] = {
    "value": lambda points: points,
    "rate": rate,
    "gib": lambda points: [(t, v / 2**30) for t, v in points],
}


def frame(found: list[tuple[str, tuple[str, ...], str, list[dict[str, Any]]]]) -> pd.DataFrame:
    """Series from the gateway as one long table (time, value, series) for a line plot."""
    rows = []
    for metric, keys, transform, series in found:
        short = metric.removesuffix("_total").split(":")[-1]
        for s in series:
            name = " ".join([short, *(f"{k}={s['labels'].get(k, '')}" for k in keys)])
            for t, v in _TRANSFORMS[transform]([tuple(p) for p in s["points"]]):
                rows.append((dt.datetime.fromtimestamp(t), v, name))
    return pd.DataFrame(rows, columns=["time", "value", "series"])


def alerts_markdown(status: dict[str, Any]) -> str:
    alerts = status.get("alerts") or []
    lines = ["**Active alerts**" if alerts else "**No active alerts.**"]
    mark = {"critical": "🔴", "warning": "🟠", "info": "🔵"}
    lines += [f"- {mark.get(a['severity'], '•')} {a['summary']} ({a['rule']})" for a in alerts]
    down = [c for c in status.get("collectors", []) if not c["up"]]
    if down:
        lines.append("")
        lines.append("Collectors not working: " + "; ".join(
            f"**{c['collector']}** ({c['level']}): {c['error']}" for c in down))  # fmt: skip
    return "\n".join(lines)


def topology_markdown(found: dict[str, Any]) -> str:
    """The topology as an indented tree from its roots, faults marked."""
    nodes = {n["id"]: n for n in found["topology"]["nodes"]}
    children: dict[str, list[str]] = {}
    targets = set()
    for a, b in found["topology"]["edges"]:
        children.setdefault(a, []).append(b)
        targets.add(b)
    if not nodes:
        return f"Nothing found for **{found['query']}**."
    lines: list[str] = []

    def walk(node_id: str, depth: int, seen: set[str]) -> None:
        node = nodes[node_id]
        mark = "⚠️ " if node["status"] == "fault" else ""
        lines.append(f"{'  ' * depth}- {mark}**{node['kind']}**: {node['label']}")
        for child in children.get(node_id, []):
            if child not in seen:
                walk(child, depth + 1, seen | {child})

    for root in [n for n in nodes if n not in targets]:
        walk(root, 0, {root})
    faults = found.get("faults") or []
    head = f"**{len(found['matches'])} match(es)** for `{found['query']}`"
    if faults:
        head += f"; **{len(faults)} fault(s)**: " + ", ".join(f["label"] for f in faults)
    return head + "\n\n" + "\n".join(lines)


@dataclass
class MonitoringView:
    """What the app wires to sign-in: show the tab to administrators and refresh it."""

    on_sign_in: Callable[[Any], Any]


def build_monitoring(ctx: WebContext) -> MonitoringView:
    note = gr.Markdown("Monitoring is for administrators.", elem_id="mon-note")
    with gr.Column(visible=False, elem_id="mon-body") as body:
        widgets = _build_body()
    return _wire(ctx, note, body, *widgets)


def _build_body():
    alerts = gr.Markdown("", elem_id="mon-alerts")
    with gr.Row():
        level = gr.Radio(LEVELS, value="Cluster", label="Level", elem_id="mon-level", scale=3)
        node = gr.Dropdown(label="Node (drill-down)", choices=[], elem_id="mon-node", scale=2)
        window = gr.Dropdown(
            [("15 minutes", 900), ("1 hour", 3600), ("6 hours", 21600)], value=900,
            label="Window", scale=1,
        )  # fmt: skip
    # One set of plots per level, shown one level at a time: a plot keeps its title and kind of
    # series, and only its data changes.
    columns, plots = [], []
    for name, panels in PLOTS.items():
        with gr.Column(visible=name == LEVELS[0]) as column, gr.Row():
            for i, (title, _) in enumerate(panels):
                plots.append(gr.LinePlot(
                    x="time", y="value", color="series", title=title, height=220,
                    min_width=300, elem_id=f"mon-{name.lower()}-{i}",
                ))  # fmt: skip
        columns.append(column)
    with gr.Row():
        query = gr.Textbox(label="Search: a job id, model, node, user or request id",
                           scale=4, max_lines=1, elem_id="mon-query")  # fmt: skip
        search_btn = gr.Button("Search", scale=1, min_width=80, elem_id="mon-search")
    topology = gr.Markdown("", elem_id="mon-topology")
    requests = gr.Dataframe(
        headers=["Request", "User", "Model", "Job", "Node", "Status", "Seconds", "Tokens"],
        value=[], interactive=False, label="Recent requests", elem_id="mon-requests",
    )  # fmt: skip
    timer = gr.Timer(10.0)
    return alerts, level, node, window, columns, plots, query, search_btn, topology, requests, timer


def _wire(ctx, note, body, alerts, level, node, window, columns, plots, query, search_btn,
          topology, requests, timer) -> MonitoringView:  # fmt: skip
    async def refresh(session, chosen_level, chosen_node, since_s):
        skip_all = [gr.skip()] * (3 + len(columns) + len(plots))
        if not is_admin(session):
            return skip_all
        token = token_of(session)
        try:
            status = await ctx.client.monitoring_status(token)
            healthy = await ctx.client.series(token, "appliance_node_healthy", 600)
            recent = await ctx.client.recent_requests(token, 30)
        except GatewayError as exc:
            return [f"Monitoring is not available: {exc}", *skip_all[1:]]
        nodes = sorted({s["labels"].get("node", "") for s in healthy} - {""})
        if chosen_node not in nodes:
            chosen_node = nodes[0] if nodes else None
        data = []
        for name, panels in PLOTS.items():
            for _, lines in panels:
                if name != chosen_level:
                    data.append(gr.skip())
                    continue
                found = []
                for metric, keys, transform in lines:
                    labels = {"node": chosen_node} if "node" in keys and chosen_node else {}
                    try:
                        series = await ctx.client.series(token, metric, since_s, **labels)
                    except GatewayError:
                        series = []
                    found.append((metric, keys, transform, series))
                data.append(frame(found))
        rows = [
            [r["id"], r["user"], r["model"], r["job_id"] or "", r["node"] or "", r["status"],
             round(r["duration_s"] or 0, 2), r["completion_tokens"]]
            for r in recent
        ]  # fmt: skip
        shown = [gr.Column(visible=name == chosen_level) for name in PLOTS]
        return [
            alerts_markdown(status),
            gr.Dropdown(choices=nodes, value=chosen_node),
            rows,
            *shown,
            *data,
        ]

    outputs = [alerts, node, requests, *columns, *plots]
    inputs = [ctx.session, level, node, window]
    tick = timer.tick(refresh, inputs, outputs, show_progress="hidden")
    # A tick started before the user changed the level would draw the old level's plots under
    # the new titles: cancel it.
    gr.on([level.change, node.input, window.change], refresh, inputs, outputs, cancels=[tick])

    async def find(session, text):
        if not text.strip():
            return ""
        return topology_markdown(await gateway(ctx.client.search(token_of(session), text.strip())))

    gr.on([search_btn.click, query.submit], find, [ctx.session, query], [topology])

    def show(session):
        admin = is_admin(session)
        return gr.Markdown(visible=not admin), gr.Column(visible=admin)

    def on_sign_in(dep):
        return dep.then(show, [ctx.session], [note, body]).then(refresh, inputs, outputs)

    return MonitoringView(on_sign_in)
