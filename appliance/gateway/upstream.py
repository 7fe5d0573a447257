"""What a failing instance looks like from the gateway, and the error a request gets when no
instance of its model can be had."""

from __future__ import annotations

import aiohttp

from appliance.gateway.protocol import RequestError, server_error, try_again_later
from appliance.serving.access import UpstreamError
from appliance.serving.manager import InstanceStartError, InstanceWaitTimeout
from appliance.serving.wait_queue import WaitQueueFull

# Connection refused or reset, a body cut short, or no answer in time.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, UpstreamError)


def acquire_error(model: str, exc: Exception) -> RequestError:
    """The client's error when waiting for an instance of `model` failed with `exc`."""
    if isinstance(exc, WaitQueueFull):
        return try_again_later(str(exc), "queue_full", exc.retry_after_s)
    if isinstance(exc, InstanceWaitTimeout):
        return server_error(str(exc), code="instance_start_timeout", status=503)
    if isinstance(exc, InstanceStartError):
        return server_error(str(exc), code="instance_start_failed", status=503)
    return server_error(f"cannot serve {model}: {exc}", code="model_unavailable", status=503)
