"""The cluster side of the breaker's long-lived session (`session`, grammar.py): many commands
over one SSH session, each in an OPEN frame (framing.py) checked against the same grammar as a
single command, their answers multiplexed by request id and relayed as they come.

A frame that breaks the framing (unknown kind, over the size bound, cut short, id 0 or an id in
use) ends the session: a refusal for id 0, then every request of the session is cancelled. A
command outside the grammar, or over the bound of requests in flight, is refused alone and the
session goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.serving.breaker.actions import BreakerActions
from appliance.serving.breaker.framing import (
    CANCEL,
    DATA,
    END,
    FAILED,
    GATEWAY_KINDS,
    HEAD,
    REFUSED,
    Frame,
    FramingError,
    encode,
    read_frame,
)
from appliance.serving.breaker.grammar import (
    MAX_LINE,
    Command,
    Forward,
    Refused,
    Session,
    parse,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256
# Bytes of one DATA frame: a larger chunk from an instance goes out in several.
MAX_DATA = 64 * 1024
# Refusals recorded one by one in the audit log; past that, one count at the session's end
# (a flood of refused frames costs the sender nothing and must not fill the disk).
AUDITED_REFUSALS = 20


def max_open_payload(max_request_bytes: int) -> int:
    """The largest OPEN frame: a command line, its newline and a request body."""
    return MAX_LINE + 1 + max_request_bytes


def decode_request(frame: Frame, max_request_bytes: int) -> tuple[Command, bytes]:
    """The command and body an OPEN frame carries; Refused unless its line is in the grammar
    and only a forward POST has a body."""
    line, newline, body = frame.payload.partition(b"\n")
    if not newline:
        raise Refused("no newline after the command line")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("command has characters outside the grammar") from None
    command = parse(text)
    if isinstance(command, Session):
        raise Refused("a session inside a session")
    if body and not (isinstance(command, Forward) and command.method == "POST"):
        raise Refused("only a forward POST carries a body")
    if len(body) > max_request_bytes:
        raise Refused(f"request body larger than {max_request_bytes} bytes")
    return command, body


class _FrameReply:
    """A command's answer as frames of its request id."""

    def __init__(self, session: SessionServer, request_id: int):
        self.session = session
        self.request_id = request_id

    async def head(self, data: dict) -> None:
        await self.session.send(self.request_id, HEAD, json.dumps(data).encode())

    async def data(self, chunk: bytes) -> None:
        for start in range(0, len(chunk), MAX_DATA):
            await self.session.send(self.request_id, DATA, chunk[start : start + MAX_DATA])


@dataclass(eq=False)
class SessionServer:
    """Serves one session: frames from `reader`, answers to `writer` (an asyncio StreamWriter,
    or anything with write and drain); `audit(reason, command)` records a refusal (it may
    block: it runs in a thread)."""

    actions: BreakerActions
    reader: asyncio.StreamReader
    writer: Any
    audit: Callable[[str, str], None]
    max_request_bytes: int
    max_in_flight: int = MAX_IN_FLIGHT
    requests: dict[int, asyncio.Task] = field(default_factory=dict)
    refusals: int = 0

    async def send(self, request_id: int, kind: int, payload: bytes = b"") -> None:
        # One write per frame: frames of concurrent requests never interleave.
        self.writer.write(encode(request_id, kind, payload))
        await self.writer.drain()

    async def run(self) -> None:
        """Serve frames until the gateway closes its side or breaks the framing."""
        try:
            await self._serve()
        except FramingError as exc:
            await self._refuse(0, f"session closed: {exc}", "")
        except (ConnectionError, BrokenPipeError):
            pass  # the gateway's side is gone: nothing to tell it
        finally:
            for task in self.requests.values():
                task.cancel()
            await asyncio.gather(*self.requests.values(), return_exceptions=True)
            if self.refusals > AUDITED_REFUSALS:
                left = self.refusals - AUDITED_REFUSALS
                await asyncio.to_thread(self.audit, f"{left} more refusals in this session", "")

    async def _serve(self) -> None:
        limit = max_open_payload(self.max_request_bytes)
        while (frame := await read_frame(self.reader, limit, GATEWAY_KINDS)) is not None:
            if frame.kind == CANCEL:
                # An id that is over already is no error: its end and the cancel crossed. The
                # id is free at once (its task ends on its own), and so is its place.
                if (task := self.requests.pop(frame.request_id, None)) is not None:
                    task.cancel()
                continue
            if frame.request_id == 0 or frame.request_id in self.requests:
                raise FramingError(f"request id {frame.request_id} is not free")
            shown = frame.payload.partition(b"\n")[0][:120].decode(errors="replace")
            try:
                command, body = decode_request(frame, self.max_request_bytes)
            except Refused as exc:
                await self._refuse(frame.request_id, str(exc), shown)
                continue
            if len(self.requests) >= self.max_in_flight:
                await self._refuse(frame.request_id, "too many requests in flight", shown)
                continue
            self.requests[frame.request_id] = asyncio.create_task(
                self._request(frame.request_id, command, body, shown)
            )

    async def _request(self, request_id: int, command: Command, body: bytes, shown: str) -> None:
        try:
            await self.actions.run(command, body, _FrameReply(self, request_id))
        except Refused as exc:
            await self._refuse(request_id, str(exc), shown)
        except asyncio.CancelledError:
            return  # the gateway cancelled it, or the session ends: no answer wanted
        except (ConnectionError, BrokenPipeError):
            return
        except Exception as exc:  # one failed command must not end the others
            log.warning("breaker command %r failed: %r", shown, exc)
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await self.send(request_id, FAILED, f"{type(exc).__name__}: {exc}"[:500].encode())
        else:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await self.send(request_id, END)
        finally:
            if self.requests.get(request_id) is asyncio.current_task():
                del self.requests[request_id]

    async def _refuse(self, request_id: int, reason: str, shown: str) -> None:
        self.refusals += 1
        if self.refusals <= AUDITED_REFUSALS:
            await asyncio.to_thread(self.audit, reason, repr(shown))
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.send(request_id, REFUSED, f"refused: {reason}".encode())
