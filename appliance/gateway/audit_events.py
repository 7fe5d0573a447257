"""Writing audit entries from the gateway: off the event loop (each entry is fsynced), never
failing the request that caused it (a full disk is logged, the request goes on)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request

log = logging.getLogger(__name__)


async def audit(request: Request, actor: str, action: str, target: str = "", **detail: Any) -> None:
    """Record who did what to what; `detail` must be JSON-serializable."""
    log_ = request.app.state.gateway.audit
    client = request.client.host if request.client else ""
    try:
        await asyncio.to_thread(log_.append, actor, action, target, client=client, **detail)
    except Exception:  # the audit log must not take the service down with it
        log.exception("could not write the audit entry %s %s %s", actor, action, target)
