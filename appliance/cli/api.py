"""The CLI's calls to the gateway's HTTP API, with the key in APPLIANCE_API_KEY and the gateway's
certificate trusted when it serves TLS."""

from __future__ import annotations

from typing import Any

import httpx

from appliance import envs
from appliance.cli.context import CliContext
from appliance.errors import ApplianceError


class GatewayUnreachable(ApplianceError):
    """Nothing answers at the gateway's address."""


def gateway_call(ctx: CliContext, method: str, path: str, timeout: float = 60, **kwargs: Any):
    """The JSON answer of one request; an ApplianceError with the gateway's message (and its
    details, such as a dataset's bad lines) for an error answer, GatewayUnreachable when nothing
    answers."""
    settings = ctx.settings
    url = settings.gateway_url + path
    key = envs.APPLIANCE_API_KEY
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(
            method, url, timeout=timeout, headers=headers, verify=settings.tls_verify, **kwargs
        )
    except (httpx.HTTPError, FileNotFoundError) as exc:
        message = f"the gateway at {url} does not answer ({exc}); is it up?"
        raise GatewayUnreachable(message) from None
    try:
        data = resp.json()
    except ValueError:
        answer = f"{resp.status_code}: {resp.text[:300]}"
        raise ApplianceError(f"the gateway answered {answer}") from None
    if resp.status_code >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        message = error.get("message", resp.text)
        if error.get("details") and not all(d in message for d in error["details"]):
            message += "\n" + "\n".join(error["details"])
        if resp.status_code == 401:
            message = (
                f"the gateway refused APPLIANCE_API_KEY: {message}"
                if key
                else f"the gateway at {settings.gateway_url} needs an API key: set "
                "APPLIANCE_API_KEY (an administrator makes one with `appliance keys create`)"
            )
        raise ApplianceError(message)
    return data
