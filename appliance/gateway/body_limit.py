"""A limit on every request body, by route: small where no key is needed (anyone can send
those), `gateway.max_request_bytes` elsewhere; uploads keep their own limits, which their routes
check against the declared length before reading."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.config import ApplianceSettings
from appliance.gateway.protocol import RequestError

# The routes that answer without a key (their bodies are read before anyone is known).
UNAUTHENTICATED = frozenset({"/health", "/v1/auth/sign_in"})
# Uploads: they refuse a missing or too large Content-Length themselves (rag.max_upload_bytes,
# training.max_dataset_bytes), and a server reads no more than the declared length.
UPLOADS = (
    # A base is named by itself or by owner/name (its route takes a path).
    ("POST", re.compile(r"/v1/knowledge_bases/.+/documents")),
    ("POST", re.compile(r"/v1/files")),
)


def is_upload(method: str, path: str) -> bool:
    return any(method == m and pattern.fullmatch(path) for m, pattern in UPLOADS)


def body_limit(settings: ApplianceSettings, method: str, path: str) -> int | None:
    """The most bytes a request body may have on this route; None: the route checks."""
    if path in UNAUTHENTICATED:
        return settings.gateway.max_unauthenticated_request_bytes
    if is_upload(method, path):
        return None
    return settings.gateway.max_request_bytes


def too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is larger than {limit} bytes", code="too_large")


class BodyLimit:
    """ASGI middleware: a body over its route's limit gets HTTP 413, before it is read when its
    Content-Length says so, else as soon as the bytes received pass the limit (chunked)."""

    def __init__(
        self,
        app: ASGIApp,
        settings: ApplianceSettings,
        refused: Callable[[Request, RequestError], None],
    ):
        self.app, self.settings, self.refused = app, settings, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(self.settings, scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            error = too_large(limit)
            self.refused(Request(scope), error)
            await error.response()(scope, receive, send)
            return
        await self.app(scope, _limited(receive, limit), send)


def _limited(receive: Receive, limit: int) -> Callable[[], Awaitable[Message]]:
    """`receive`, raising the 413 once the body passes `limit` bytes; the route that reads the
    body fails with it, and the app's handler for RequestError answers it."""
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)
        return message

    return receive_limited
