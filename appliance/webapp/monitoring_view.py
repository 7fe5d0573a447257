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

from appliance.monitoring.history import rate
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, bind, gateway, is_admin, token_of

# level -> [(plot title, [(metric, label keys naming the line, transform)])]
Line = tuple[str, tuple[str, ...], str]  # metric, labels shown, "value" | "rate" | "gib"


def _line(metric: str, *labels: str, transform: str = "value") -> Line:
    return metric, labels, transform


PLOTS: dict[str, list[tuple[str, list[Line]]]] = {
    "Cluster": [
        ("CPUs allocated / total", [_line("slurm_cpus_alloc"), _line("slurm_cpus_total")]),
        ("GPUs allocated / total", [_line("slurm_gpus_alloc"), _line("slurm_gpus_total")]),
        ("Jobs running / pending", [_line("slurm_queue_running"), _line("slurm_queue_pending")]),
        ("Nodes drained / down", [_line("slurm_nodes_drain"), _line("slurm_nodes_down")]),
    ],
    "Node": [
        ("CPUs allocated", [_line("slurm_node_cpus_alloc", "node")]),
        ("Load", [_line("slurm_node_cpu_load", "node")]),
        ("Healthy (1) or not (0)", [_line("appliance_node_healthy", "node")]),
        ("GPUs allocated", [_line("slurm_node_gpus_alloc", "node")]),
    ],
    "Component": [
        ("CPU busy (share)", [_line("appliance_cpu_busy_ratio")]),
        ("Memory available (GiB)", [_line("node_memory_MemAvailable_bytes", transform="gib")]),
        ("GPU utilisation (%)", [_line("DCGM_FI_DEV_GPU_UTIL", "gpu")]),
        ("GPU temperature (C)", [_line("DCGM_FI_DEV_GPU_TEMP", "gpu")]),
    ],
    "Task": [
        (
            "Requests per second",
            [_line("appliance_requests_total", "model", "status", transform="rate")],
        ),
        ("Tokens per second", [_line("appliance_tokens_total", "model", "kind", transform="rate")]),
        (
            "Running / waiting (vLLM)",
            [
                _line("vllm:num_requests_running", "job_id"),
                _line("vllm:num_requests_waiting", "job_id"),
            ],
        ),
        ("KV cache used (vLLM)", [_line("vllm:kv_cache_usage_perc", "job_id")]),
    ],
}
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
        broken = (f"**{c['collector']}** ({c['level']}): {c['error']}" for c in down)
        lines.append("Collectors not working: " + "; ".join(broken))
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


def request_rows(recent: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["id"],
            r["user"],
            r["model"],
            r["job_id"] or "",
            r["node"] or "",
            r["status"],
            round(r["duration_s"] or 0, 2),
            r["completion_tokens"],
        ]
        for r in recent
    ]


@dataclass
class MonitoringView:
    """What the app wires to sign-in: show the tab to administrators and refresh it."""

    on_sign_in: Callable[[Any], Any]


@dataclass
class MonitoringComponents:
    """The Monitoring tab's components; `columns` hold each level's `plots`."""

    note: gr.Markdown
    body: gr.Column
    alerts: gr.Markdown
    level: gr.Radio
    node: gr.Dropdown
    window: gr.Dropdown
    columns: list[gr.Column]
    plots: list[gr.LinePlot]
    query: gr.Textbox
    search_btn: gr.Button
    topology: gr.Markdown
    requests: gr.Dataframe
    timer: gr.Timer


def monitoring_components() -> MonitoringComponents:
    note = gr.Markdown("Monitoring is for administrators.", elem_id="mon-note")
    with gr.Column(visible=False, elem_id="mon-body") as body:
        alerts = gr.Markdown("", elem_id="mon-alerts")
        with gr.Row():
            level = gr.Radio(LEVELS, value="Cluster", label="Level", elem_id="mon-level", scale=3)
            node = gr.Dropdown(label="Node (drill-down)", choices=[], elem_id="mon-node", scale=2)
            window = gr.Dropdown(
                [("15 minutes", 900), ("1 hour", 3600), ("6 hours", 21600)],
                value=900,
                label="Window",
                scale=1,
            )
        # One set of plots per level, shown one level at a time: a plot keeps its title and kind
        # of series, and only its data changes.
        columns, plots = [], []
        for name, panels in PLOTS.items():
            with gr.Column(visible=name == LEVELS[0]) as column, gr.Row():
                for i, (title, _) in enumerate(panels):
                    plot = gr.LinePlot(
                        x="time",
                        y="value",
                        color="series",
                        title=title,
                        height=220,
                        min_width=300,
                        elem_id=f"mon-{name.lower()}-{i}",
                    )
                    plots.append(plot)
            columns.append(column)
        with gr.Row():
            query = gr.Textbox(
                label="Search: a job id, model, node, user or request id",
                scale=4,
                max_lines=1,
                elem_id="mon-query",
            )
            search_btn = gr.Button("Search", scale=1, min_width=80, elem_id="mon-search")
        topology = gr.Markdown("", elem_id="mon-topology")
        requests = gr.Dataframe(
            headers=["Request", "User", "Model", "Job", "Node", "Status", "Seconds", "Tokens"],
            value=[],
            interactive=False,
            label="Recent requests",
            elem_id="mon-requests",
        )
        timer = gr.Timer(10.0)
    return MonitoringComponents(
        note,
        body,
        alerts,
        level,
        node,
        window,
        columns,
        plots,
        query,
        search_btn,
        topology,
        requests,
        timer,
    )


async def _plot_data(ctx: WebContext, token: str, level: str, node: str | None, since_s):
    """Each plot's table: the chosen level's from the gateway, the other levels' unchanged."""
    data = []
    for name, panels in PLOTS.items():
        for _, lines in panels:
            if name != level:
                data.append(gr.skip())
                continue
            found = []
            for metric, keys, transform in lines:
                labels = {"node": node} if "node" in keys and node else {}
                try:
                    series = await ctx.client.series(token, metric, since_s, **labels)
                except GatewayError:
                    series = []
                found.append((metric, keys, transform, series))
            data.append(frame(found))
    return data


async def refresh(ctx: WebContext, session, chosen_level, chosen_node, since_s):
    """Alerts, the nodes to drill into, recent requests, and the chosen level's plots."""
    skip_all = [gr.skip()] * (3 + len(PLOTS) + sum(len(panels) for panels in PLOTS.values()))
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
    data = await _plot_data(ctx, token, chosen_level, chosen_node, since_s)
    shown = [gr.Column(visible=name == chosen_level) for name in PLOTS]
    return [
        alerts_markdown(status),
        gr.Dropdown(choices=nodes, value=chosen_node),
        request_rows(recent),
        *shown,
        *data,
    ]


async def find(ctx: WebContext, session, text):
    if not text.strip():
        return ""
    return topology_markdown(await gateway(ctx.client.search(token_of(session), text.strip())))


def show(session):
    admin = is_admin(session)
    return gr.Markdown(visible=not admin), gr.Column(visible=admin)


def build_monitoring(ctx: WebContext) -> MonitoringView:
    return wire_monitoring(ctx, monitoring_components())


def wire_monitoring(ctx: WebContext, c: MonitoringComponents) -> MonitoringView:
    """Connect the tab's components to its handlers; it follows the stack on a timer."""
    outputs = [c.alerts, c.node, c.requests, *c.columns, *c.plots]
    inputs = [ctx.session, c.level, c.node, c.window]
    tick = c.timer.tick(bind(ctx, refresh), inputs, outputs, show_progress="hidden")
    # A tick started before the user changed the level would draw the old level's plots under
    # the new titles: cancel it.
    changed = [c.level.change, c.node.input, c.window.change]
    gr.on(changed, bind(ctx, refresh), inputs, outputs, cancels=[tick])
    gr.on(
        [c.search_btn.click, c.query.submit], bind(ctx, find), [ctx.session, c.query], [c.topology]
    )

    def on_sign_in(dep):
        return dep.then(show, [ctx.session], [c.note, c.body]).then(
            bind(ctx, refresh), inputs, outputs
        )

    return MonitoringView(on_sign_in)
