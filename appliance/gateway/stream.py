"""Relays one streamed response across instances: waits for one (scale from zero), retries on
another while nothing was sent, and moves a resumable stream to another instance when its own is
leaving or has failed, so the client's answer goes on without a gap or a repeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from appliance.errors import ApplianceError
from appliance.gateway.migration import StreamRecord
from appliance.gateway.protocol import RequestError, error_fields, server_error
from appliance.gateway.upstream import UPSTREAM_ERRORS, acquire_error
from appliance.gateway.usage import Usage, UsageFilter
from appliance.serving.access import TransportLost
from appliance.serving.instance import Instance

if TYPE_CHECKING:
    from appliance.gateway.forward import Forwarder

log = logging.getLogger(__name__)

DONE_MARKER = b"data: [DONE]"
# vLLM ends the requests of an engine that died with this finish reason (and then [DONE]): a
# truncated answer that looks complete unless the gateway says otherwise.
ABORTED_MARKER = b'"finish_reason":"abort"'
# An error event from the instance (vLLM sends one, then [DONE], when its engine dies).
UPSTREAM_ERROR_MARKER = b'data: {"error"'
# While streams should leave its instance (Instance.moves_wanted), a stream that has waited
# this long for the instance's next bytes moves: a stalled one on a leaving instance moves
# within about twice this.
STALL_CHECK_S = 0.1
# Otherwise a stream looks this often (a move asked for wakes it at once): one timer per
# stream stays cheap with hundreds of streams.
IDLE_CHECK_S = 1.0


class StreamWatcher(Protocol):
    """Learns where a stream runs: each instance it is sent to, the pause of each move, and
    the tokens it used."""

    def instance(self, inst: Instance) -> None: ...

    def resumed(self, pause_s: float) -> None:
        """The first event from the new instance went out `pause_s` after the last from the
        old one."""

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The stream's usage chunk came: its tokens, all choices together."""


def upstream_error(event: bytes) -> tuple[int, str]:
    """The HTTP code and message of an instance's in-band error event (500 when unreadable):
    vLLM sends one, then [DONE], when a streamed request fails after its 200."""
    fields = error_fields(event)
    if fields is None:
        return 500, event[:200].decode(errors="replace").strip()
    return fields[0], fields[1][:500]


@dataclass
class _Outcome:
    """How relaying from one instance ended."""

    done: bool = False
    target: Instance | None = None  # moved: the instance it continues on
    failure: str = ""
    way_lost: bool = False  # the way to the instance broke, not the instance (TransportLost)


class Stream:
    """One streamed response, from the first instance to [DONE]."""

    def __init__(
        self,
        forwarder: Forwarder,
        path: str,
        request: bytes,
        model: str,
        record: StreamRecord | None,
        watcher: StreamWatcher | None,
        hide_usage: bool = False,
        key: str | None = None,
        user: str = "",
    ):
        """`hide_usage`: the usage chunk was asked for by the gateway, not the client: it is
        read, then left out of the client's stream (appliance/gateway/usage.py); `key`: the
        prompt's prefix, for the routing policy; `user`: who asked, for the wait queue."""
        self.key = key
        self.user = user
        self.forwarder = forwarder
        self.manager = forwarder.manager
        self.settings = forwarder.settings
        self.path = path
        self.request = request
        self.model = model
        self.record = record
        self.watcher = watcher
        self.usage = UsageFilter(hide_usage, self._report)
        # When the last event before a move (or a failure) went out; None when not moving.
        self.paused_at: float | None = None
        # When the client last got an event: a move's pause counts from there, as the client
        # sees it (the wait before a stall is noticed included).
        self.last_sent_at: float | None = None
        self.exclude: set[int] = set()
        self.sent = False
        self.continued = False
        self.failures = 0
        self.last_chunk_at = time.monotonic()

    def _next_request(self) -> tuple[str, bytes]:
        if self.continued and self.record is not None:
            return self.record.continuation()
        return self.path, self.request

    async def run(self, inst: Instance | None = None, upstream=None) -> AsyncIterator[bytes]:
        """The bytes of the streamed response, across waits, retries and moves."""
        max_retries = self.settings.gateway.max_retries
        while True:
            if inst is None:
                holder: list[Instance] = []
                try:
                    async for comment in self._wait_for_instance(holder):
                        yield comment
                except ApplianceError as exc:
                    yield acquire_error(self.model, exc).sse_event()
                    return
                inst = holder[0]
                if self.watcher is not None:
                    self.watcher.instance(inst)
            if upstream is None:
                path, body = self._next_request()
                try:
                    upstream = await self.forwarder.open(inst, path, body)
                except UPSTREAM_ERRORS as exc:
                    self._failed(inst, repr(exc))
                    inst = None
                    if self.failures > max_retries:
                        yield server_error(
                            f"the instances of {self.model} failed: {exc!r}"
                        ).sse_event()
                        return
                    continue
                if upstream.status >= 500 and self.failures < max_retries:
                    upstream.close()
                    self._failed(inst, f"HTTP {upstream.status}")
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
            outcome = _Outcome()
            try:
                async for out in self._relay(inst, upstream, outcome):
                    yield out
            except BaseException:
                # The client went away (cancellation or generator close): the instances are fine.
                self.manager.release(inst)
                if outcome.target is not None:
                    self.manager.release(outcome.target)
                raise
            if outcome.done:
                self.manager.release(inst)
                return
            if outcome.target is not None:
                log.info(
                    "moved a stream of %s from instance %s to %s after %d tokens (%s)",
                    self.model,
                    inst.job_id,
                    outcome.target.job_id,
                    self.record.complete if self.record else 0,
                    inst.reason,
                )
                self.manager.release(inst)
                inst, upstream = outcome.target, None
                self.continued = True
                if self.watcher is not None:
                    self.watcher.instance(inst)
                continue
            if outcome.way_lost:
                # The instance is fine and still ours: it gets the request again.
                self.failures += 1
                log.warning("the way to instance %s broke: %s", inst.job_id, outcome.failure)
            else:
                self._failed(inst, outcome.failure)
            resumable = self.record is not None and self.record.resumable
            if self.failures <= max_retries and (not self.sent or resumable):
                # Nothing sent: start over; something sent: continue from its tokens (elsewhere
                # when the instance failed).
                if not self.sent:
                    self.usage.release()  # held back from the failed try, never sent
                self.continued = self.continued or self.sent
                if self.sent and self.paused_at is None:
                    self.paused_at = self.last_sent_at or time.monotonic()
                upstream = None
                if not outcome.way_lost:
                    inst = None
                continue
            if outcome.way_lost:
                self.manager.release(inst)
            yield (
                self.usage.release()
                + server_error(
                    f"instance {inst.job_id} of {self.model} failed in the middle of the response "
                    f"({outcome.failure}); the answer is incomplete, please retry"
                ).sse_event()
            )
            return

    def _failed(self, inst: Instance, reason: str) -> None:
        self.manager.release(inst, failed=True)
        self.exclude.add(inst.job_id)
        self.failures += 1
        log.warning("instance %s broke a stream of %s: %s", inst.job_id, self.model, reason)

    async def _relay(self, inst: Instance, upstream, outcome: _Outcome) -> AsyncIterator[bytes]:
        """Events from one instance, until [DONE], a failure, or a move (when the instance is
        leaving and another one can take the stream)."""
        record = self.record
        buffer = b""
        finished = False
        if record is not None:
            inst.streams.add(record)  # the rebalancer looks at what it would cost to move
        watchdog = None
        if record is not None:
            watchdog = asyncio.create_task(self._watch(inst, upstream, outcome))
        try:
            async for chunk in upstream.content.iter_any():
                self.last_chunk_at = time.monotonic()
                buffer += chunk
                while (cut := buffer.find(b"\n\n")) >= 0:
                    event, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                    if event.startswith(DONE_MARKER):
                        outcome.done = True
                        yield self.usage.release() + event
                        return
                    if event.startswith(UPSTREAM_ERROR_MARKER):
                        code, message = upstream_error(event)
                        if code < 500:
                            # The request's own fault (vLLM's 4xx): another instance would
                            # refuse it too, and this one is fine.
                            outcome.done = True
                            yield self.usage.release() + event
                            return
                        outcome.failure = f"it reported: {message}"
                        return
                    if ABORTED_MARKER in event:
                        outcome.failure = "it aborted the request"
                        return
                    out = self.usage.events(self._client_bytes(event))
                    if out:
                        if self.paused_at is not None and self.watcher is not None:
                            self.watcher.resumed(time.monotonic() - self.paused_at)
                        self.paused_at = None
                        yield out
                        self.sent = True
                        self.last_sent_at = time.monotonic()
                    if outcome.target is not None:
                        return  # the watchdog moved the stream while the client was reading
                    if record is not None and record.ended:
                        # The upstream goes on: it is closed below.
                        yield self.usage.events(record.ending())
                        outcome.done = True
                        return
                    inst.last_data = time.time()
                    if self._move(inst, outcome):
                        return
            if outcome.target is None:
                finished = True
                outcome.failure = "the stream ended before [DONE]"
        except UPSTREAM_ERRORS as exc:
            if outcome.target is None:  # else the watchdog closed it
                outcome.failure = repr(exc)
                outcome.way_lost = isinstance(exc, TransportLost)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            inst.streams.discard(record)
            # A finished body returns the connection to the pool; anything else drops it.
            if finished:
                upstream.release()
            else:
                upstream.close()

    async def _watch(self, inst: Instance, upstream, outcome: _Outcome) -> None:
        """Moves the stream when it should leave `inst` and no bytes have come for a while: a
        leaving instance that has stalled does not hold its streams. Closing the upstream ends
        the relay (the part of an event already read is dropped: its tokens were not relayed,
        so they are recomputed). One task per relay, not one per chunk: relaying stays cheap."""
        while True:
            if inst.moves_wanted.is_set():
                await asyncio.sleep(STALL_CHECK_S)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(inst.moves_wanted.wait(), IDLE_CHECK_S)
            quiet = time.monotonic() - self.last_chunk_at >= STALL_CHECK_S
            if quiet and self._move(inst, outcome):
                upstream.close()
                return

    def _move(self, inst: Instance, outcome: _Outcome) -> bool:
        """Move the stream off `inst` if it should go and another instance can take it now."""
        record = self.record
        if record is None or not record.resumable or not self.manager.should_move(inst, record):
            return False
        target = self.manager.try_acquire(self.model, self.exclude | {inst.job_id}, self.key)
        if target is None:
            return False
        self.manager.moved(inst)
        self.paused_at = self.last_sent_at or time.monotonic()
        outcome.target = target
        return True

    def _client_bytes(self, event: bytes) -> bytes:
        if self.record is None:
            return event
        try:
            return self.record.relay(event, self.continued)
        except (ValueError, TypeError, AttributeError):
            return event  # not the JSON we expect: pass it on as it came

    def _report(self, usage: Usage) -> None:
        if self.watcher is not None:
            self.watcher.usage(usage.prompt, usage.completion)

    async def _wait_for_instance(self, holder: list[Instance]) -> AsyncIterator[bytes]:
        """Wait for an instance, sending SSE comments so the client's connection stays open."""
        gw = self.settings.gateway
        model = self.model
        task = asyncio.create_task(
            self.manager.acquire(model, gw.start_timeout_s, self.exclude, self.key, self.user)
        )
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
