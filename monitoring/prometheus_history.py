"""History read from a Prometheus server (`monitoring.prometheus_url`) instead of the embedded
one: the same `query(name, since, **labels)` answered through /api/v1/query_range."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from appliance.monitoring.history import Series

_LABEL_VALUE = re.compile(r'["\\\n]')


def _escape(value: str) -> str:
    return _LABEL_VALUE.sub(lambda m: "\\n" if m.group(0) == "\n" else "\\" + m.group(0), value)


MAX_POINTS = 500


def selector(name: str, labels: dict[str, str]) -> str:
    """`name{a="b"}`, label values escaped as PromQL wants."""
    matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    # The name goes into a query as it is: only metric-name characters (':' too, for vLLM's).
    if not re.match(r"^[A-Za-z_:][A-Za-z0-9_:]*$", name):
        raise ValueError(f"not a metric name: {name!r}")
    return f"{name}{{{matchers}}}" if matchers else name


class PrometheusHistory:
    """Range queries against a Prometheus server."""

    def __init__(self, url: str, get: Callable[..., Any] | None = None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._get = get or (lambda *a, **kw: httpx.get(*a, timeout=timeout, **kw))

    def query(self, name: str, since: float = 0.0, **labels: str) -> list[Series]:
        end = time.time()
        start = max(since, end - 7 * 86400)
        step = max(1.0, (end - start) / MAX_POINTS)
        response = self._get(
            self.url + "/api/v1/query_range",
            params={"query": selector(name, labels), "start": start, "end": end, "step": step},
        )
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus: {body.get('error', body)}")
        out = []
        for result in body["data"]["result"]:
            metric = dict(result["metric"])
            metric.pop("__name__", None)
            points = [(float(t), float(v)) for t, v in result["values"]]
            out.append(Series(name, metric, points))
        return out
