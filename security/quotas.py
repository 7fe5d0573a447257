"""Quotas and rate limits per key and per user: requests per minute (sliding window), tokens
per UTC day, concurrent streams. A refused request gets HTTP 429 with Retry-After. Tokens and
request counts are kept in SQLite, so a restart of the gateway does not reset them."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config.security import Limits, SecuritySettings

log = logging.getLogger(__name__)

WINDOW_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (kind, name, day)
)
"""
_ADD = """
INSERT INTO usage (kind, name, day, requests, tokens) VALUES (?, ?, ?, 1, ?)
ON CONFLICT (kind, name, day)
DO UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens
"""


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


def _open_db(path: Path) -> sqlite3.Connection:
    """The usage database, mode 0600 (SQLite gives its -wal and -shm files the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_NOFOLLOW: a link planted at the path does not make us write elsewhere.
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: each commit is atomic and survives a crash of the gateway without an
    # fsync per request (a power cut may lose the last few, never corrupt the file).
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(_SCHEMA)
    return db


class Quotas:
    """Counters of use against the limits. With `path`, tokens per day and request totals are
    written to that SQLite file as each request ends, and read back at start; the per-minute
    window and open streams start empty (a restart ends every stream). Without it (tests),
    everything is in memory."""

    def __init__(
        self,
        settings: SecuritySettings,
        clock: Callable[[], float] = time.time,
        path: Path | None = None,
    ):
        self.settings = settings
        self.clock = clock
        self._usage: dict[tuple[str, str], _Usage] = {}
        self._lock = threading.Lock()
        self._db = _open_db(path) if path is not None else None
        if self._db is not None:
            self._load(self._db)

    def _load(self, db: sqlite3.Connection) -> None:
        today = self._today()
        for kind, name, day, requests, tokens in db.execute(
            "SELECT kind, name, day, requests, tokens FROM usage"
        ):
            usage = self._usage.setdefault((kind, name), _Usage(day=today))
            usage.total_requests += requests
            if day == today:
                usage.tokens += tokens

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
                    raise QuotaExceeded(
                        f"{who} reached its limit of {rpm} requests per minute "
                        "(security.quotas.requests_per_minute)",
                        wait,
                    )
                if limits.tokens_per_day is not None and usage.tokens >= limits.tokens_per_day:
                    midnight = dt.datetime.fromisoformat(usage.day).replace(tzinfo=dt.UTC)
                    wait = (midnight + dt.timedelta(days=1)).timestamp() - now
                    raise QuotaExceeded(
                        f"{who} used its {limits.tokens_per_day} tokens for today (used "
                        f"{usage.tokens}; security.quotas.tokens_per_day); the count starts "
                        "again at 00:00 UTC",
                        wait,
                    )
                streams = limits.concurrent_streams
                if stream and streams is not None and usage.streams >= streams:
                    raise QuotaExceeded(
                        f"{who} has {streams} streams open already "
                        "(security.quotas.concurrent_streams)",
                        1,
                    )
            for subject in subjects:
                usage = self._usage_of(subject)
                usage.requests.append(now)
                usage.total_requests += 1
                usage.streams += int(stream)
        return Ticket(subjects, stream)

    def done(self, ticket: Ticket, tokens: int) -> None:
        """The request ended having used `tokens`: count them, and close its stream."""
        with self._lock:
            for subject in ticket.subjects:
                usage = self._usage_of(subject)
                usage.tokens += tokens
                usage.streams -= int(ticket.stream)
            if self._db is not None:
                today = self._today()
                rows = [(kind, name, today, tokens) for kind, name in ticket.subjects]
                try:
                    # One transaction for the user and the key: both counts change, or neither.
                    with self._db:
                        self._db.executemany(_ADD, rows)
                except sqlite3.Error as exc:
                    # The request is served and counted in memory; a full disk must not fail it.
                    log.error("cannot record usage %s: %s", rows, exc)

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
