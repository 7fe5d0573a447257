"""Runs the collectors, each at its own interval, on one background thread; keeps their latest
metrics for /metrics (so a scrape only renders) and feeds the embedded history. A collector that
fails or is unavailable says so in `appliance_collector_up` and leaves the others alone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from appliance.monitoring.history import History
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)
LEVELS = ("component", "node", "cluster", "task")


@dataclass
class Source:
    """One collector: what it reads, at which level, how often."""

    name: str
    level: str
    read: Callable[[], list[Metric]]
    interval_s: float = 1.0
    families: list[Metric] = field(default_factory=list)
    up: bool = False
    error: str = ""
    duration_s: float = 0.0
    last_success: float = 0.0
    due: float = 0.0


class Monitor:
    """The collectors, their latest metrics, and the history."""

    def __init__(
        self,
        sources: Iterable[Source],
        history: History | None = None,
        live: Iterable[Callable[[], Iterable[Metric]]] = (),
        tick_s: float = 1.0,
        history_step_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.sources = list(sources)
        self.history = history or History()
        self.live = list(live)
        self.tick_s = tick_s
        self.history_step_s = history_step_s
        self._history_due = 0.0
        self.clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    # ----- collecting -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Run every collector that is due (all of them with `force`), then record history."""
        now = self.clock()
        for source in self.sources:
            if not force and now < source.due:
                continue
            started = time.perf_counter()
            try:
                families = source.read()
                error = ""
            except Exception as exc:  # one collector's failure must not stop the others
                families, error = [], f"{type(exc).__name__}: {exc}"
                log.debug("collector %s failed: %s", source.name, error)
            with self._lock:
                source.duration_s = time.perf_counter() - started
                source.up = not error
                source.error = error
                source.due = now + source.interval_s
                if not error:
                    source.families, source.last_success = families, now
                else:
                    source.families = []
        if now >= self._history_due:
            self._history_due = now + self.history_step_s
            self.history.record(now, self.collect())

    def collect(self) -> list[Metric]:
        """The latest metrics of every collector, the live ones, and the collectors' state."""
        with self._lock:
            out = [f for s in self.sources for f in s.families]
            up = GaugeMetricFamily(
                "appliance_collector_up",
                "1 when the collector's last run worked.",
                labels=["collector", "level"],
            )
            duration = GaugeMetricFamily(
                "appliance_collector_duration_seconds",
                "How long the collector's last run took.",
                labels=["collector"],
            )
            for s in self.sources:
                up.add_metric([s.name, s.level], 1 if s.up else 0)
                duration.add_metric([s.name], s.duration_s)
        for live in self.live:
            out += list(live())
        return [*out, up, duration]

    def status(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "collector": s.name,
                    "level": s.level,
                    "up": s.up,
                    "error": s.error,
                    "duration_s": round(s.duration_s, 4),
                    "interval_s": s.interval_s,
                    "last_success": s.last_success,
                }
                for s in self.sources
            ]

    def render(self) -> bytes:
        """The Prometheus text exposition of `collect()`."""
        return generate_latest(self._registry)

    # ----- the background thread -----------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # pragma: no cover - refresh guards each collector already
                log.exception("monitoring refresh failed")
            self._stop.wait(max(0.0, self.tick_s - (time.monotonic() - started)))
