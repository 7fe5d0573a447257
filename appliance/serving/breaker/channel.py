"""The gateway's end of one breaker session (the `session` command over ssh): each command goes
out as an OPEN frame with a new request id, and a reader task hands the answers' frames to
their requests as they come. When the session ends, every request still open fails with
TransportLost."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque

from appliance.errors import ApplianceError
from appliance.serving.access import TransportLost, UpstreamError
from appliance.serving.breaker.framing import (
    BREAKER_KINDS,
    CANCEL,
    DATA,
    END,
    HEAD,
    OPEN,
    REFUSED,
    FramingError,
    encode,
    read_frame,
)

# The largest frame the gateway reads: a listing of many instances is one HEAD frame.
MAX_ANSWER = 16 * 1024 * 1024
# Lines of ssh's stderr kept for an error message.
STDERR_LINES = 64
ENDED = "the breaker's session has ended"


class BreakerError(ApplianceError):
    """The breaker refused a command, or could not be reached; the message says which."""


class Call:
    """One request of a session: its head, then its body's chunks as they come."""

    def __init__(self, channel: Channel, request_id: int, line: str):
        self.channel = channel
        self.request_id = request_id
        self.line = line
        self.head: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        # Chunks, None at the end, or the exception that ended it. Not bounded: an answer is
        # bounded by its tokens, and waiting for room would hold up every other request.
        self._chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.over = False

    def answer(self, kind: int, payload: bytes) -> None:
        if kind == HEAD and not self.head.done():
            try:
                self.head.set_result(json.loads(payload))
            except ValueError:
                self.fail(BreakerError(f"the breaker's answer to {self.line!r} is not JSON"))
        elif kind == DATA:
            self._chunks.put_nowait(payload)
        elif kind == END:
            self._end(None)
        else:
            text = payload.decode(errors="replace").removeprefix("refused: ")
            verb = "refused" if kind == REFUSED else "failed"
            self.fail(BreakerError(f"the breaker {verb} {self.line.split(' ')[0]}: {text}"))

    def fail(self, exc: Exception) -> None:
        """End the request with `exc`: raised by `head` if it has not come, else by `next`."""
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # marked as seen: the waiter may have given up
        self._end(exc if isinstance(exc, UpstreamError) else UpstreamError(str(exc)))

    def _end(self, item: Exception | None) -> None:
        if not self.over:
            self.over = True
            self._chunks.put_nowait(item)
            self.channel.calls.pop(self.request_id, None)

    async def next(self) -> bytes | None:
        """The body's next chunk, None at its end; UpstreamError (TransportLost when the
        session ended) when it broke off."""
        item = await self._chunks.get()
        if item is None or isinstance(item, Exception):
            self._chunks.put_nowait(item)  # the same for any later read
        if isinstance(item, Exception):
            raise item
        return item

    async def rest(self) -> bytes:
        parts = []
        while (chunk := await self.next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def cancel(self) -> None:
        """Give the request up: the breaker stops it (and its HTTP request to the instance)."""
        if not self.over:
            self.channel.send(self.request_id, CANCEL)
            self.fail(UpstreamError("the request was given up"))


class Channel:
    """One session's ssh process: frames out on its stdin, answers in on its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self._stderr: deque[bytes] = deque(maxlen=STDERR_LINES)
        self._reader = asyncio.create_task(self._read())
        # Drained all along: a full stderr pipe would stall ssh, and every request with it.
        self._errors = asyncio.create_task(self._read_stderr())

    def start(self, line: str, body: bytes = b"") -> Call:
        """Send the command; its answer comes to the Call."""
        call = Call(self, next(self._ids), line)
        self.calls[call.request_id] = call
        self.send(call.request_id, OPEN, line.encode() + b"\n" + body)
        return call

    def send(self, request_id: int, kind: int, payload: bytes = b"") -> None:
        if self.closed:
            self._lost(ENDED)
            return
        try:
            # One write per frame: the transport queues it whole while ssh catches up.
            self.proc.stdin.write(encode(request_id, kind, payload))
        except (BrokenPipeError, ConnectionResetError):
            self._lost(ENDED)

    async def _read(self) -> None:
        reason = ENDED
        try:
            while frame := await read_frame(self.proc.stdout, MAX_ANSWER, BREAKER_KINDS):
                if frame.request_id == 0:  # the breaker ends the session, and says why
                    reason = frame.payload.decode(errors="replace")
                    break
                call = self.calls.get(frame.request_id)
                if call is not None:  # else given up: its last frames were on the way
                    call.answer(frame.kind, frame.payload)
        except FramingError as exc:
            reason = f"the breaker's answers are garbled ({exc})"
        except OSError as exc:
            reason = f"the breaker's session broke: {exc!r}"
        self._lost(reason)

    async def _read_stderr(self) -> None:
        with contextlib.suppress(OSError):
            while line := await self.proc.stderr.readline():
                self._stderr.append(line)

    def _lost(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        for call in list(self.calls.values()):
            call.fail(TransportLost(reason))

    async def close(self, wait_s: float = 10) -> tuple[int | None, bytes]:
        """End the session (the breaker sees its stdin close and stops its requests), killed
        after `wait_s`; ssh's exit status and the end of its stderr."""
        self.closed = True
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), wait_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        for task in (self._reader, self._errors):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, 10)
        self._lost("the breaker's session was closed")
        return self.proc.returncode, b"".join(self._stderr)
