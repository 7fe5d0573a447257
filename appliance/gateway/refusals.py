"""Refused requests (bad keys, non-admins on admin routes, other users' resources, failed
uploads, oversized bodies) in the audit log as counts: one entry per actor, action and reason
per minute, so a flood of refusals adds a few lines a minute, not one line a request."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from appliance.gateway.auth import AccessRefused
from appliance.gateway.body_limit import is_upload
from appliance.gateway.protocol import RequestError
from appliance.security.audit import AuditLog

WINDOW_S = 60
# Distinct (actor, action, reason) keys one window keeps; the rest are counted under OTHER.
MAX_KEYS = 256
# Distinct clients and targets an entry names; more are only counted.
MAX_NAMED = 8
OTHER = "(other)"
log = logging.getLogger(__name__)


@dataclass
class _Tally:
    count: int = 0
    clients: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)

    def add(self, client: str, target: str) -> None:
        self.count += 1
        for seen, value in ((self.clients, client), (self.targets, target)):
            if value and len(seen) < MAX_NAMED:
                seen.add(value[:200])


class Refusals:
    """Counts refusals per window in memory; `flush` writes the windows that have closed."""

    def __init__(self, audit: AuditLog, clock: Callable[[], float] = time.time):
        self.audit = audit
        self.clock = clock
        self._lock = threading.Lock()  # counted from the event loop and from worker threads
        self._windows: dict[int, dict[tuple[str, str, str], _Tally]] = {}

    def count(
        self, actor: str, action: str, reason: str, client: str = "", target: str = ""
    ) -> None:
        """One refusal of `action` for `actor` because of `reason` (short, fixed texts)."""
        start = int(self.clock()) // WINDOW_S * WINDOW_S
        key = (actor, action, reason)
        with self._lock:
            window = self._windows.setdefault(start, {})
            if key not in window and len(window) >= MAX_KEYS:
                key = (OTHER, action, OTHER)
                # The overflow keys (one per action) may take the window a few keys over.
            window.setdefault(key, _Tally()).add(client, target)

    def flush(self, everything: bool = False) -> int:
        """Write one audit entry per key of every closed window (of every window, at
        shutdown); how many were written. Blocks on the audit log's fsync: call it off the
        event loop."""
        current = int(self.clock()) // WINDOW_S * WINDOW_S
        with self._lock:
            closed = sorted(s for s in self._windows if everything or s < current)
            taken = [(s, self._windows.pop(s)) for s in closed]
        written = 0
        for start, window in taken:
            began = dt.datetime.fromtimestamp(start, dt.UTC).isoformat(timespec="seconds")
            for (actor, action, reason), tally in window.items():
                try:
                    self.audit.append(
                        actor,
                        action,
                        "",
                        reason=reason,
                        count=tally.count,
                        window_start=began,
                        window_s=WINDOW_S,
                        clients=sorted(tally.clients),
                        targets=sorted(tally.targets),
                    )
                    written += 1
                except Exception:  # a full disk must not stop the service
                    log.exception("could not record %d refusals of %s", tally.count, action)
        return written


def note(request: Request, exc: RequestError) -> None:
    """Count `exc` if it refuses an attempt the audit log keeps: a key refused, a non-admin on
    an admin route, another user's (or no) resource, a failed upload, a body over the limit."""
    who = getattr(request.state, "principal", None)  # set once the request's key was checked
    user = who.user if who is not None else "?"
    reason = exc.code or f"HTTP {exc.status}"
    if isinstance(exc, AccessRefused):
        key = (exc.actor, exc.action, exc.reason)
    elif is_upload(request.method, request.url.path) and exc.status >= 400:
        key = (user, "upload_refused", reason)
    elif exc.status == 413:
        key = (user, "body_too_large", reason)
    elif who is not None and exc.status in (403, 404):
        key = (user, "forbidden" if exc.status == 403 else "not_found", reason)
    else:
        return
    client = request.client.host if request.client else ""
    request.app.state.gateway.refusals.count(*key, client=client, target=request.url.path)
