"""What the gateway served: requests, latency, time to first byte and tokens per model and user
(Prometheus metrics), and the most recent requests with where they ran, for drill-down."""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def new_request_id() -> str:
    return "req-" + secrets.token_hex(8)


@dataclass
class RequestRecord:
    """One request as the gateway saw it."""

    id: str
    user: str
    model: str
    endpoint: str
    started_at: float
    stream: bool = False
    job_id: int | None = None
    node: str | None = None
    status: int = 0
    duration_s: float | None = None
    first_byte_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    moves: int = 0
    """Times the request went on on another instance (a move, or a retry after a failure)."""
    move_pauses_ms: list[float] = field(default_factory=list)
    """For each move of a stream: from the gateway moving it (after the last event it relayed
    from the old instance, or on finding that instance stalled) to its first event out of the
    new one."""
    done: bool = field(default=False)

    def describe(self) -> dict:
        return asdict(self)


class RequestMetrics:
    """Counters and histograms in a registry of their own, and a bounded list of recent
    requests (newest last)."""

    def __init__(self, recent: int = 2000):
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "appliance_requests",
            "Requests served, by model, user, endpoint and status.",
            ["model", "user", "endpoint", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "appliance_request_duration_seconds",
            "Time from request to its last byte.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._first_byte = Histogram(
            "appliance_request_first_byte_seconds",
            "Time to the first byte of the answer (the first token when streamed).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tokens = Counter(
            "appliance_tokens",
            "Tokens processed, by model, user and kind (prompt, completion).",
            ["model", "user", "kind"],
            registry=self.registry,
        )
        self._moves = Counter(
            "appliance_request_moves",
            "Requests that went on on another instance (preemption, drain, rebalancing, or a "
            "failed instance), by model.",
            ["model"],
            registry=self.registry,
        )
        self._move_pause = Histogram(
            "appliance_request_move_pause_seconds",
            "Pause a moved stream sees: from the gateway moving it (after the old instance's "
            "last event, or on finding it stalled) to the first event from the new one.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight: dict[str, RequestRecord] = {}
        self._recent: deque[RequestRecord] = deque(maxlen=recent)
        self._lock = threading.Lock()

    def start(self, record: RequestRecord) -> RequestRecord:
        with self._lock:
            self._in_flight[record.id] = record
        return record

    def finish(self, record: RequestRecord) -> None:
        record.done = True
        record.duration_s = time.time() - record.started_at
        labels = (record.model, record.user, record.endpoint, str(record.status))
        self._requests.labels(*labels).inc()
        self._duration.labels(record.model, record.endpoint).observe(record.duration_s)
        if record.first_byte_s is not None:
            self._first_byte.labels(record.model).observe(record.first_byte_s)
        if record.prompt_tokens:
            self._tokens.labels(record.model, record.user, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self._tokens.labels(record.model, record.user, "completion").inc(
                record.completion_tokens
            )
        with self._lock:
            self._in_flight.pop(record.id, None)
            self._recent.append(record)

    def moved(self, record: RequestRecord) -> None:
        record.moves += 1
        self._moves.labels(record.model).inc()

    def resumed(self, record: RequestRecord, pause_s: float) -> None:
        record.move_pauses_ms.append(round(pause_s * 1000, 1))
        self._move_pause.labels(record.model).observe(pause_s)

    def recent(self) -> list[RequestRecord]:
        with self._lock:
            return [*self._recent, *self._in_flight.values()]

    def collect(self):
        return self.registry.collect()
