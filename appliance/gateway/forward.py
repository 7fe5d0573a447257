"""Forwards a request to an instance: waits for one (scale from zero), retries on another
instance when one fails before anything reached the client, and relays streams byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from fastapi.responses import Response, StreamingResponse

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.gateway.protocol import RequestError, server_error
from appliance.serving.access import UpstreamError
from appliance.serving.instance import Instance
from appliance.serving.manager import InstanceManager, InstanceStartError, InstanceWaitTimeout

log = logging.getLogger(__name__)

INSTANCE_HEADER = "x-appliance-instance"
# What a failing instance looks like from the client side: connection refused or reset, a body
# cut short, or no answer in time.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, UpstreamError)
DONE_MARKER = b"data: [DONE]"
# vLLM ends the requests of an engine that died with this finish reason (and then [DONE]): a
# truncated answer that looks complete unless the gateway says otherwise.
ABORTED_MARKER = b'"finish_reason":"abort"'
# An error event from the instance (vLLM sends one, then [DONE], when its engine dies).
UPSTREAM_ERROR_MARKER = b'data: {"error"'


def _acquire_error(model: str, exc: Exception) -> RequestError:
    if isinstance(exc, InstanceWaitTimeout):
        return server_error(str(exc), code="instance_start_timeout", status=503)
    if isinstance(exc, InstanceStartError):
        return server_error(str(exc), code="instance_start_failed", status=503)
    return server_error(f"cannot serve {model}: {exc}", code="model_unavailable", status=503)


class Forwarder:
    """Sends requests to instances chosen by the manager."""

    def __init__(self, settings: ApplianceSettings, manager: InstanceManager):
        self.settings = settings
        self.manager = manager

    async def forward(
        self,
        path: str,
        raw: bytes,
        model: str,
        stream: bool,
        on_instance: Callable[[Instance], None] | None = None,
    ) -> Response:
        """Serve the request on an instance of `model`; `on_instance` learns each instance a
        stream is sent to once it is chosen (after a wait for a starting one, too)."""
        if stream:
            return await self._stream(path, raw, model, on_instance)
        return await self._unary(path, raw, model)

    # ----- plain requests -----------------------------------------------------------------

    async def _unary(self, path: str, raw: bytes, model: str) -> Response:
        exclude: set[int] = set()
        gw = self.settings.gateway
        while True:
            try:
                inst = await self.manager.acquire(model, gw.start_timeout_s, exclude)
            except ApplianceError as exc:
                return _acquire_error(model, exc).response()
            try:
                resp = await self._open(inst, path, raw)
                try:
                    content = await resp.read()
                    status = resp.status
                    media_type = resp.headers.get("content-type", "application/json")
                finally:
                    resp.release()
            except UPSTREAM_ERRORS as exc:
                self.manager.release(inst, failed=True)
                exclude.add(inst.job_id)
                log.warning("instance %s failed a request: %r", inst.job_id, exc)
                if len(exclude) > gw.max_retries:
                    return server_error(
                        f"the instances of {model} failed; last error: {exc!r}"
                    ).response()
                continue
            aborted = status == 200 and ABORTED_MARKER in content
            if (status >= 500 or aborted) and len(exclude) < gw.max_retries:
                # The instance failed (vLLM answers 5xx, or an aborted result, when its engine
                # dies): try another instance; client mistakes are 4xx and go straight back.
                self.manager.release(inst, failed=True)
                exclude.add(inst.job_id)
                log.warning("instance %s answered %s; retrying", inst.job_id, status)
                continue
            self.manager.release(inst)
            return Response(
                content,
                status_code=status,
                media_type=media_type,
                headers={INSTANCE_HEADER: str(inst.job_id)},
            )

    # ----- streams ------------------------------------------------------------------------

    async def _open(self, inst: Instance, path: str, raw: bytes) -> aiohttp.ClientResponse:
        """Send the request; the caller reads the body as it comes and releases the response."""
        return await self.manager.access.open(inst, path, raw)

    async def _stream(self, path: str, raw: bytes, model: str, on_instance=None) -> Response:
        inst = self.manager.try_acquire(model)
        if inst is None:
            return self._streaming(self._events(path, raw, model, set(), None, None, on_instance))
        # A ready instance: open upstream first so its status code (e.g. a 400 for a too long
        # prompt) reaches the client as a normal error response.
        try:
            upstream = await self._open(inst, path, raw)
        except UPSTREAM_ERRORS:
            self.manager.release(inst, failed=True)
            return self._streaming(
                self._events(path, raw, model, {inst.job_id}, None, None, on_instance)
            )
        if upstream.status >= 500:
            # The instance is failing and nothing was sent yet: go on with another instance.
            upstream.close()
            self.manager.release(inst, failed=True)
            return self._streaming(
                self._events(path, raw, model, {inst.job_id}, None, None, on_instance)
            )
        if upstream.status != 200:
            body = await upstream.read()
            upstream.release()
            self.manager.release(inst)
            return Response(
                body,
                status_code=upstream.status,
                media_type=upstream.headers.get("content-type"),
            )
        return self._streaming(
            self._events(path, raw, model, set(), inst, upstream, on_instance), inst.job_id
        )

    @staticmethod
    def _streaming(events: AsyncIterator[bytes], job_id: int | None = None) -> StreamingResponse:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        if job_id is not None:
            headers[INSTANCE_HEADER] = str(job_id)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _wait_for_instance(
        self, model: str, exclude: set[int], holder: list[Instance]
    ) -> AsyncIterator[bytes]:
        """Wait for an instance, sending SSE comments so the client's connection stays open."""
        gw = self.settings.gateway
        task = asyncio.create_task(self.manager.acquire(model, gw.start_timeout_s, exclude))
        try:
            yield f": waiting for an instance of {model}\n\n".encode()
            while True:
                done, _ = await asyncio.wait({task}, timeout=gw.keepalive_interval_s)
                if done:
                    break
                states = (
                    ", ".join(
                        f"{i.state.value}{' (' + i.reason + ')' if i.reason else ''}"
                        for i in self.manager.instances(model)
                    )
                    or "none"
                )
                yield f": still waiting for {model}: {states}\n\n".encode()
            holder.append(task.result())
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ApplianceError):
                    await task
            elif not holder and not task.cancelled() and task.exception() is None:
                # The client went away just as the instance came: give it back.
                self.manager.release(task.result())

    async def _events(
        self,
        path: str,
        raw: bytes,
        model: str,
        exclude: set[int],
        inst: Instance | None,
        upstream: aiohttp.ClientResponse | None,
        on_instance: Callable[[Instance], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """The bytes of the streamed response, across retries and waits."""
        max_retries = self.settings.gateway.max_retries
        while True:
            if inst is None:
                holder: list[Instance] = []
                try:
                    async for comment in self._wait_for_instance(model, exclude, holder):
                        yield comment
                except ApplianceError as exc:
                    yield _acquire_error(model, exc).sse_event()
                    return
                inst = holder[0]
                if on_instance is not None:
                    on_instance(inst)
            if upstream is None:
                try:
                    upstream = await self._open(inst, path, raw)
                except UPSTREAM_ERRORS as exc:
                    self.manager.release(inst, failed=True)
                    exclude.add(inst.job_id)
                    inst = None
                    if len(exclude) > max_retries:
                        yield server_error(f"the instances of {model} failed: {exc!r}").sse_event()
                        return
                    continue
                if upstream.status >= 500 and len(exclude) < max_retries:
                    upstream.close()
                    self.manager.release(inst, failed=True)
                    exclude.add(inst.job_id)
                    inst, upstream = None, None
                    continue
                if upstream.status != 200:
                    body = await upstream.read()
                    upstream.release()
                    self.manager.release(inst)
                    yield RequestError(
                        upstream.status, body.decode(errors="replace"), type="server_error"
                    ).sse_event()
                    return
            sent = False
            aborted = False
            tail = b""
            failure: Exception | None = None
            finished = False
            try:
                async for chunk in upstream.content.iter_any():
                    aborted = aborted or ABORTED_MARKER in chunk or UPSTREAM_ERROR_MARKER in chunk
                    if aborted and DONE_MARKER in chunk:
                        # Hold back [DONE]: the client gets the error event below instead.
                        chunk = chunk.replace(DONE_MARKER + b"\n\n", b"")
                        tail = (tail + chunk)[-64:]
                        if chunk:
                            yield chunk
                            sent = True
                        break
                    yield chunk
                    sent = True
                    tail = (tail + chunk)[-64:]
                    inst.last_data = time.time()
                else:
                    finished = True
            except UPSTREAM_ERRORS as exc:
                failure = exc
            except BaseException:
                # The client went away (cancellation or generator close): the instance is fine.
                self.manager.release(inst)
                raise
            finally:
                # A finished body returns the connection to the pool; anything else drops it.
                if finished:
                    upstream.release()
                else:
                    upstream.close()
            if failure is None and not aborted and DONE_MARKER in tail:
                self.manager.release(inst)
                return
            # The instance died (or cut the stream short) before finishing.
            self.manager.release(inst, failed=True)
            exclude.add(inst.job_id)
            log.warning("instance %s broke a stream of %s: %r", inst.job_id, model, failure)
            if not sent and len(exclude) <= max_retries:
                inst, upstream = None, None
                continue
            if failure is not None:
                reason = repr(failure)
            elif aborted:
                reason = "the instance aborted the request or reported an error"
            else:
                reason = "the stream ended before [DONE]"
            yield server_error(
                f"instance {inst.job_id} of {model} failed in the middle of the response "
                f"({reason}); the answer is incomplete, please retry"
            ).sse_event()
            return
