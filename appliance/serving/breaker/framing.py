"""The frame codec of the breaker's long-lived session: each frame is a 9-byte header (payload
length, request id, kind; big-endian) and its payload. A length over the reader's bound, a kind
the reader does not expect or a frame cut short is a FramingError: a length-prefixed stream
cannot be resynchronised after one, so the session ends."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIB")

# Gateway to breaker.
OPEN = ord("O")  # a command line of the grammar, "\n", the body of a forward POST
CANCEL = ord("C")  # the gateway gave the request up (empty payload)
# Breaker to gateway.
HEAD = ord("H")  # the JSON answer (a forward's: status and content type)
DATA = ord("D")  # part of a forward's body, as it came from the instance
END = ord("E")  # the request is over
REFUSED = ord("R")  # refused (the grammar, or what the command names); the text says why
FAILED = ord("F")  # the command failed on the cluster; the text says why

GATEWAY_KINDS = frozenset({OPEN, CANCEL})
BREAKER_KINDS = frozenset({HEAD, DATA, END, REFUSED, FAILED})
# The largest id; 0 is the session itself (a framing error's refusal).
MAX_REQUEST_ID = 2**32 - 1


class FramingError(ValueError):
    """The byte stream is not a sequence of well-formed frames."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    request_id: int
    kind: int
    payload: bytes = b""


def encode(request_id: int, kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), request_id, kind) + payload


async def read_frame(
    reader: asyncio.StreamReader, max_payload: int, kinds: frozenset[int]
) -> Frame | None:
    """The next frame, or None at the end of the stream between two frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FramingError("the stream ended inside a frame header") from None
    length, request_id, kind = HEADER.unpack(header)
    if kind not in kinds:
        raise FramingError(f"unknown frame kind {kind}")
    if length > max_payload:
        raise FramingError(f"frame of {length} bytes, more than {max_payload}")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FramingError("the stream ended inside a frame") from None
    return Frame(request_id, kind, payload)
