"""An embedded, bounded time-series history, so the built-in dashboards work without a
Prometheus server: every series keeps its last `points` samples in fixed-size arrays, and no
more than `max_series` series are kept (new ones beyond that are counted, not stored)."""

from __future__ import annotations

import itertools
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import Metric

# Histogram buckets, creation stamps and per-CPU counters make many series and say little on a
# dashboard (appliance_cpu_busy_ratio says what the CPU counters would).
_SKIP_SUFFIXES = ("_bucket", "_created")
_SKIP_NAMES = frozenset({"node_cpu_seconds_total"})


@dataclass(frozen=True)
class Series:
    """One series' samples in time order."""

    name: str
    labels: dict[str, str]
    points: list[tuple[float, float]]


class _Ring:
    __slots__ = ("count", "start", "times", "values")

    def __init__(self, size: int):
        self.times = array("d", bytes(8 * size))
        self.values = array("d", bytes(8 * size))
        self.start = 0
        self.count = 0

    def add(self, t: float, v: float) -> None:
        size = len(self.times)
        i = (self.start + self.count) % size
        self.times[i], self.values[i] = t, v
        if self.count < size:
            self.count += 1
        else:
            self.start = (self.start + 1) % size

    def points(self, since: float) -> list[tuple[float, float]]:
        size = len(self.times)
        out = []
        for k in range(self.count):
            i = (self.start + k) % size
            if self.times[i] >= since:
                out.append((self.times[i], self.values[i]))
        return out


class History:
    """Samples of the families given to `record`, queryable by name and labels."""

    def __init__(self, points: int = 1440, max_series: int = 4000):
        self.points = points
        self.max_series = max_series
        self.dropped_series = 0
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], _Ring] = {}
        self._lock = threading.Lock()

    def record(self, t: float, families: Iterable[Metric]) -> None:
        with self._lock:
            for family in families:
                for s in family.samples:
                    if s.name.endswith(_SKIP_SUFFIXES) or s.name in _SKIP_NAMES:
                        continue
                    key = (s.name, tuple(sorted(s.labels.items())))
                    ring = self._series.get(key)
                    if ring is None:
                        if len(self._series) >= self.max_series:
                            self.dropped_series += 1
                            continue
                        ring = self._series[key] = _Ring(self.points)
                    ring.add(t, float(s.value))

    def query(self, name: str, since: float = 0.0, **labels: str) -> list[Series]:
        """The series called `name` whose labels include `labels`."""
        with self._lock:
            found = [
                (key, ring)
                for key, ring in self._series.items()
                if key[0] == name and all(dict(key[1]).get(k) == v for k, v in labels.items())
            ]
            return [Series(k[0], dict(k[1]), ring.points(since)) for k, ring in found]

    def names(self) -> list[str]:
        with self._lock:
            return sorted({key[0] for key in self._series})

    def __len__(self) -> int:
        return len(self._series)


def rate(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-second increase of a counter between samples (a reset counts from zero)."""
    out = []
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t1 > t0:
            out.append((t1, (v1 - v0 if v1 >= v0 else v1) / (t1 - t0)))
    return out
