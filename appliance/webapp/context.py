"""What every part of the web app shares: settings, the gateway client, the browser's state,
and turning gateway refusals into messages for the user."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gradio as gr

from appliance.config import ApplianceSettings
from appliance.webapp.client import GatewayClient, GatewayError

T = TypeVar("T")
# The signed-in user as the browser keeps it: {"token", "user", "role", "single_user", ...};
# empty when nobody is signed in.
Session = dict[str, Any]


@dataclass
class WebContext:
    """Shared by the tabs: settings, the gateway client, and the browser-held state."""

    settings: ApplianceSettings
    client: GatewayClient
    session: gr.BrowserState
    store: gr.BrowserState


def bind(ctx: WebContext, handler: Callable[..., Any]) -> Callable[..., Any]:
    """`handler` with `ctx` as its first argument, for an event's function. It keeps the
    handler's name: Gradio names the event's API endpoint after it."""
    bound = functools.partial(handler, ctx)
    bound.__name__ = handler.__name__
    return bound


def signed_in(session: Session | None) -> bool:
    return bool(session and session.get("user"))


def is_admin(session: Session | None) -> bool:
    return signed_in(session) and session.get("role") == "admin"


def token_of(session: Session | None) -> str:
    if not signed_in(session):
        raise gr.Error("Sign in first.")
    return session.get("token", "")


async def gateway(call: Awaitable[T]) -> T:
    """Await a gateway call; a refusal becomes a message shown to the user."""
    try:
        return await call
    except GatewayError as exc:
        if exc.status == 401:
            raise gr.Error(
                f"Your sign-in is no longer valid ({exc}). Sign out and in again."
            ) from None
        raise gr.Error(str(exc)) from None
