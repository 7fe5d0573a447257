"""Records each OpenAI request the gateway serves: id, user, model, the instance (Slurm job) and
node it ran on, status, latency, time to first byte and tokens (monitoring/requests.py); and
counts it against its user's and key's quotas: every token it caused, prompt and answer,
streamed or not, and what knowledge bases embedded for it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from appliance.gateway.audit_events import audit
from appliance.gateway.forward import INSTANCE_HEADER
from appliance.gateway.metering import metering
from appliance.gateway.protocol import error_fields
from appliance.gateway.usage import CHOICE_MARKER, body_usage, estimate_prompt, quota_error
from appliance.monitoring.requests import RequestMetrics, RequestRecord, new_request_id
from appliance.security.api_keys import Principal
from appliance.security.quotas import QuotaExceeded

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _CLIENT_ID.fullmatch(given) else new_request_id()


class RequestWatcher:
    """A stream's instances and moves, into its request record (appliance/gateway/stream.py)."""

    def __init__(self, metrics: RequestMetrics, record: RequestRecord):
        self.metrics, self.record = metrics, record
        self.reported = False  # the stream's usage chunk came: its counts are exact

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.record.prompt_tokens, self.record.completion_tokens = prompt_tokens, completion_tokens
        self.reported = True

    def instance(self, inst) -> None:  # a stream learns its instance late, or moves
        if self.record.job_id is not None and self.record.job_id != inst.job_id:
            self.metrics.moved(self.record)
        self.record.job_id, self.record.node = inst.job_id, inst.node

    def resumed(self, pause_s: float) -> None:
        self.metrics.resumed(self.record, pause_s)


async def observed(
    request: Request,
    who: Principal,
    model: str,
    endpoint: str,
    stream: bool,
    call: Callable[[RequestWatcher], Awaitable[Response]],
    prompt: Any = None,
) -> Response:
    gw = request.app.state.gateway
    try:
        ticket = gw.quotas.admit(who.user, who.key_id, stream)
    except QuotaExceeded as exc:
        return quota_error(exc).response()
    if gw.settings.security.audit_prompts and prompt is not None:
        # With the user content encrypted at rest, the prompt goes into the data volume
        # (security/audit.py: sealed details), not into the plaintext chain.
        sealed = {"prompt": prompt}
        await audit(request, who.user, "prompt", model, endpoint=endpoint, sealed=sealed)
    record = RequestRecord(_request_id(request), who.user, model, endpoint, time.time(), stream)
    gw.requests.start(record)
    watcher = RequestWatcher(gw.requests, record)
    embedded = 0

    def finish(record: RequestRecord) -> None:
        if stream and not watcher.reported and record.completion_tokens:
            # Cut before its usage chunk, after the instance read the prompt.
            record.prompt_tokens = estimate_prompt(prompt)
        gw.requests.finish(record)
        gw.quotas.done(ticket, record.prompt_tokens + record.completion_tokens + embedded)

    try:
        with metering() as meter:
            try:
                response = await call(watcher)
            finally:
                embedded = meter.tokens
    except BaseException:
        record.status, record.error = 500, "the gateway failed"
        finish(record)
        raise
    response.headers[REQUEST_ID_HEADER] = record.id
    job = response.headers.get(INSTANCE_HEADER)
    if job and job.isdigit():
        record.job_id = int(job)
        inst = gw.manager.get(record.job_id)
        record.node = inst.node if inst else None
    record.status = response.status_code
    if isinstance(response, StreamingResponse):
        response.body_iterator = _counted(response.body_iterator, watcher, finish)
        return response
    record.first_byte_s = time.time() - record.started_at
    body = getattr(response, "body", b"")
    if response.status_code >= 400:
        record.error = _error_text(body)
    elif body and (usage := body_usage(body)) is not None:
        record.prompt_tokens, record.completion_tokens = usage
    finish(record)
    return response


def _error_text(body: bytes) -> str:
    fields = error_fields(body)
    return fields[1][:300] if fields else body[:300].decode(errors="replace")


async def _counted(
    events: AsyncIterator[bytes],
    watcher: RequestWatcher,
    finish: Callable[[RequestRecord], None],
) -> AsyncIterator[bytes]:
    """Relay a stream, counting its chunks until its usage chunk gives the exact counts (vLLM
    sends about one token per choice per chunk)."""
    record = watcher.record
    try:
        async for chunk in events:
            if record.first_byte_s is None and b"data: {" in chunk:
                record.first_byte_s = time.time() - record.started_at
            if not watcher.reported:
                record.completion_tokens += chunk.count(CHOICE_MARKER)
            if b'data: {"error"' in chunk:
                record.status, record.error = 502, _error_text(chunk.split(b"data: ", 1)[1])
            yield chunk
    except BaseException:
        record.status = record.status if record.status >= 400 else 499
        record.error = record.error or "the client went away"
        raise
    finally:
        finish(record)
