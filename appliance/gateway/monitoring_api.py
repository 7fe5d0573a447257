"""Monitoring through the gateway: /metrics (Prometheus text), and for the dashboards the
collectors' state, the history of a metric, recent requests, and search with topology."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from appliance.gateway.auth import administrator
from appliance.gateway.protocol import RequestError
from appliance.monitoring.alerts import active_alerts
from appliance.monitoring.prometheus_history import PrometheusHistory
from appliance.monitoring.topology import search

router = APIRouter(dependencies=[Depends(administrator)])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _monitor(request: Request):
    monitor = request.app.state.gateway.monitor
    if monitor is None:
        raise RequestError(404, "monitoring is turned off (monitoring.enabled)")
    return monitor


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Every collector's latest metrics; a scrape renders, it does not collect."""
    body = await asyncio.to_thread(_monitor(request).render)
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/admin/monitoring/status")
async def status(request: Request) -> dict:
    monitor = _monitor(request)
    families = await asyncio.to_thread(monitor.collect)
    return {
        "collectors": monitor.status(),
        "alerts": [a.describe() for a in active_alerts(families)],
        "history": {"series": len(monitor.history), "dropped": monitor.history.dropped_series},
    }


@router.get("/admin/monitoring/series")
async def series(request: Request, name: str, since_s: float = 3600) -> dict:
    """The history of metric `name`; other query parameters select labels (node=n1)."""
    labels = {k: v for k, v in request.query_params.items() if k not in ("name", "since_s")}
    history = _monitor(request).history
    url = request.app.state.gateway.settings.monitoring.prometheus_url
    if url:
        history = PrometheusHistory(url)
    try:
        found = await asyncio.to_thread(history.query, name, time.time() - since_s, **labels)
    except Exception as exc:  # the Prometheus server is down or refuses the query
        raise RequestError(502, f"history is not available: {exc}") from None
    return {"name": name, "series": [{"labels": s.labels, "points": s.points} for s in found]}


@router.get("/admin/monitoring/requests")
async def recent_requests(request: Request, limit: int = 100) -> dict:
    records = request.app.state.gateway.requests.recent()[-max(1, min(limit, 2000)) :]
    return {"requests": [r.describe() for r in reversed(records)]}


@router.get("/admin/monitoring/search")
async def find(request: Request, q: str) -> dict:
    """Everything related to a job id, model, node, user or request id, with its topology."""
    gw = request.app.state.gateway
    monitor = _monitor(request)
    families = await asyncio.to_thread(monitor.collect)
    return search(q.strip(), families, gw.manager.instances(), gw.requests.recent())
