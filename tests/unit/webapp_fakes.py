"""A stand-in for the web app's gateway client and context, for testing the tabs' handlers
without a gateway or a browser."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.config import ApplianceSettings
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext

ADMIN = {"token": "t-alice", "user": "alice", "role": "admin"}
USER = {"token": "t-bob", "user": "bob", "role": "user"}
REFUSED = GatewayError(403, "not allowed")


class FakeClient:
    """Answers every gateway call from `replies` (by method name; an exception is raised, a
    callable is called with the call's arguments) and records the calls in `calls`."""

    def __init__(self, **replies: Any):
        self.replies = replies
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str):
        async def call(*args: Any, **labels: Any) -> Any:
            self.calls.append((name, *args, *labels.values()))
            reply = self.replies.get(name)
            if isinstance(reply, Exception):
                raise reply
            return reply(*args, **labels) if callable(reply) else reply

        return call

    async def chat_stream(self, token: str, body: dict[str, Any]):
        self.calls.append(("chat_stream", token, body))
        for event in self.replies["chat_stream"]:
            yield event

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of each call of `name`."""
        return [call[1:] for call in self.calls if call[0] == name]


def context(client: FakeClient) -> WebContext:
    # The browser state components are not needed by handlers: they get its values.
    return WebContext(ApplianceSettings(), client, None, None)


def run(call: Any) -> Any:
    """The result of an async handler, or everything an async generator handler yielded."""
    if hasattr(call, "__anext__"):

        async def collect() -> list[Any]:
            return [item async for item in call]

        return asyncio.run(collect())
    return asyncio.run(call)


def given(update: Any) -> dict[str, Any]:
    """What a component update sets: Gradio sends only the arguments given to it."""
    return update._constructor_args[0]
