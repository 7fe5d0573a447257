"""Quotas and rate limits per key and per user: requests per minute (sliding window), tokens
per UTC day, concurrent streams. A refused request gets HTTP 429 with Retry-After."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.config.security import Limits, SecuritySettings

WINDOW_S = 60.0


class QuotaExceeded(Exception):
    """A limit is reached; `retry_after_s` says when the request would be admitted."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s + 0.999))


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    day: str = ""
    tokens: int = 0
    streams: int = 0
    total_requests: int = 0


@dataclass
class Ticket:
    """An admitted request; give it back with `Quotas.done`."""

    subjects: tuple[tuple[str, str], ...]
    stream: bool


class Quotas:
    """Counters in memory (they start again when the gateway restarts)."""

    def __init__(self, settings: SecuritySettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._usage: dict[tuple[str, str], _Usage] = {}
        self._lock = threading.Lock()

    def _limits(self, kind: str, name: str) -> Limits:
        overrides = self.settings.user_quotas if kind == "user" else self.settings.key_quotas
        return overrides.get(name, self.settings.quotas)

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()

    def _usage_of(self, subject: tuple[str, str]) -> _Usage:
        usage = self._usage.setdefault(subject, _Usage())
        now, today = self.clock(), self._today()
        while usage.requests and usage.requests[0] <= now - WINDOW_S:
            usage.requests.popleft()
        if usage.day != today:
            usage.day, usage.tokens = today, 0
        return usage

    def admit(self, user: str, key_id: str, stream: bool) -> Ticket:
        """Count a request against its user and key, or refuse it (QuotaExceeded)."""
        subjects = (("user", user),) + ((("key", key_id),) if key_id else ())
        now = self.clock()
        with self._lock:
            for kind, name in subjects:
                limits, usage = self._limits(kind, name), self._usage_of((kind, name))
                who = f"{kind} {name}"
                rpm = limits.requests_per_minute
                if rpm is not None and len(usage.requests) >= rpm:
                    wait = usage.requests[0] + WINDOW_S - now
                    raise QuotaExceeded(f"{who} reached {rpm} requests per minute", wait)
                if limits.tokens_per_day is not None and usage.tokens >= limits.tokens_per_day:
                    midnight = dt.datetime.fromisoformat(usage.day).replace(tzinfo=dt.UTC)
                    wait = (midnight + dt.timedelta(days=1)).timestamp() - now
                    raise QuotaExceeded(
                        f"{who} used its {limits.tokens_per_day} tokens for today", wait
                    )
                streams = limits.concurrent_streams
                if stream and streams is not None and usage.streams >= streams:
                    raise QuotaExceeded(f"{who} has {streams} streams open already", 1)
            for subject in subjects:
                usage = self._usage_of(subject)
                usage.requests.append(now)
                usage.total_requests += 1
                usage.streams += int(stream)
        return Ticket(subjects, stream)

    def done(self, ticket: Ticket, tokens: int) -> None:
        with self._lock:
            for subject in ticket.subjects:
                usage = self._usage_of(subject)
                usage.tokens += tokens
                usage.streams -= int(ticket.stream)

    def usage(self, kind: str | None = None, name: str | None = None) -> list[dict]:
        """Current use against the limits, for one user or key or for everyone."""
        out = []
        with self._lock:
            for k, n in list(self._usage):
                if (kind is None or k == kind) and (name is None or n == name):
                    usage, limits = self._usage_of((k, n)), self._limits(k, n)
                    out.append(
                        {
                            "kind": k,
                            "name": n,
                            "day": usage.day,
                            "requests_last_minute": len(usage.requests),
                            "tokens_today": usage.tokens,
                            "streams_open": usage.streams,
                            "requests_total": usage.total_requests,
                            "limits": limits.model_dump(),
                        }
                    )
        return out
