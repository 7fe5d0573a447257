"""Forwards a request to an instance: waits for one (scale from zero) and retries on another
instance when one fails before anything reached the client; streams are relayed by
appliance/gateway/stream.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from fastapi.responses import Response, StreamingResponse

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.gateway.migration import StreamRecord
from appliance.gateway.protocol import server_error
from appliance.gateway.stream import ABORTED_MARKER, Stream, StreamWatcher
from appliance.gateway.upstream import UPSTREAM_ERRORS, acquire_error
from appliance.gateway.usage import asking_for_usage
from appliance.serving.access import TransportLost
from appliance.serving.instance import Instance
from appliance.serving.manager import InstanceManager

log = logging.getLogger(__name__)

INSTANCE_HEADER = "x-appliance-instance"


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
        watcher: StreamWatcher | None = None,
        key: str | None = None,
        user: str = "",
    ) -> Response:
        """Serve the request on an instance of `model`; `watcher` learns each instance a stream
        is sent to once it is chosen (after a wait for a starting one, too) and each move;
        `key` names the prompt's prefix for the routing policy (gateway/prefix_key.py); `user`
        asks (the wait queue is shared fairly between users)."""
        if stream:
            return await self._stream(path, raw, model, watcher, key, user)
        return await self._unary(path, raw, model, key, user)

    # ----- plain requests -----------------------------------------------------------------

    async def _unary(
        self, path: str, raw: bytes, model: str, key: str | None, user: str
    ) -> Response:
        exclude: set[int] = set()
        gw = self.settings.gateway
        lost = 0
        while True:
            try:
                inst = await self.manager.acquire(model, gw.start_timeout_s, exclude, key, user)
            except ApplianceError as exc:
                return acquire_error(model, exc).response()
            try:
                resp = await self.open(inst, path, raw)
                try:
                    content = await resp.read()
                    status = resp.status
                    media_type = resp.headers.get("content-type", "application/json")
                finally:
                    resp.release()
            except TransportLost as exc:
                # Its answer broke off with the way to it: the instance gets it again.
                self.manager.release(inst)
                lost += 1
                log.info("the way to instance %s broke mid-answer: %s", inst.job_id, exc)
                if lost > gw.max_retries:
                    return server_error(f"the way to {model}'s instances broke: {exc}").response()
                continue
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

    async def open(self, inst: Instance, path: str, raw: bytes) -> aiohttp.ClientResponse:
        """Send the request; the caller reads the body as it comes and releases the response."""
        try:
            return await self.manager.access.open(inst, path, raw)
        except TransportLost as exc:
            # The way to the instance broke, not the instance: once more, on the new way.
            log.info("the way to instance %s broke (%s); sending again", inst.job_id, exc)
            return await self.manager.access.open(inst, path, raw)

    async def _stream(
        self,
        path: str,
        raw: bytes,
        model: str,
        watcher=None,
        key: str | None = None,
        user: str = "",
    ) -> Response:
        # Every stream asks for its usage chunk: the tokens it used are counted from it.
        raw, client_asked = asking_for_usage(raw)
        # A resumable stream asks its instance for token ids, so it can move to another one.
        record = StreamRecord.open(path, raw)
        request = record.first_request() if record else raw
        events = Stream(
            self,
            path,
            request,
            model,
            record,
            watcher,
            hide_usage=not client_asked,
            key=key,
            user=user,
        )
        inst = self.manager.try_acquire(model, key=key)
        if inst is None:
            try:  # before the stream's 200: a full queue is an HTTP 429
                self.manager.ensure_waiting_room(model, user)
            except ApplianceError as exc:
                return acquire_error(model, exc).response()
            return self._streaming(events.run())
        # A ready instance: open upstream first so its status code (e.g. a 400 for a too long
        # prompt) reaches the client as a normal error response.
        try:
            upstream = await self.open(inst, path, request)
        except UPSTREAM_ERRORS:
            self.manager.release(inst, failed=True)
            events.exclude.add(inst.job_id)
            return self._streaming(events.run())
        if upstream.status >= 500:
            # The instance is failing and nothing was sent yet: go on with another instance.
            upstream.close()
            self.manager.release(inst, failed=True)
            events.exclude.add(inst.job_id)
            return self._streaming(events.run())
        if upstream.status != 200:
            body = await upstream.read()
            upstream.release()
            self.manager.release(inst)
            return Response(
                body,
                status_code=upstream.status,
                media_type=upstream.headers.get("content-type"),
            )
        return self._streaming(events.run(inst, upstream), inst.job_id)

    @staticmethod
    def _streaming(events: AsyncIterator[bytes], job_id: int | None = None) -> StreamingResponse:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        if job_id is not None:
            headers[INSTANCE_HEADER] = str(job_id)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
