"""The breaker session's frame codec: frames round-trip; a frame over the bound, of an unknown
kind or cut short is a FramingError; the end of the stream between frames is not."""

from __future__ import annotations

import asyncio

import pytest

from appliance.serving.breaker.framing import (
    BREAKER_KINDS,
    DATA,
    GATEWAY_KINDS,
    HEAD,
    OPEN,
    Frame,
    FramingError,
    encode,
    read_frame,
)


def frames(data: bytes, max_payload: int = 1024, kinds=GATEWAY_KINDS) -> list[Frame]:
    async def read() -> list[Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while (frame := await read_frame(reader, max_payload, kinds)) is not None:
            out.append(frame)
        return out

    return asyncio.run(read())


def test_frames_round_trip():
    data = encode(1, OPEN, b"ping\n") + encode(2**32 - 1, OPEN, b"x" * 1024) + encode(3, OPEN)
    assert frames(data) == [
        Frame(1, OPEN, b"ping\n"),
        Frame(2**32 - 1, OPEN, b"x" * 1024),
        Frame(3, OPEN, b""),
    ]
    assert frames(encode(5, HEAD, b"{}") + encode(5, DATA, b"a"), kinds=BREAKER_KINDS) == [
        Frame(5, HEAD, b"{}"),
        Frame(5, DATA, b"a"),
    ]


@pytest.mark.parametrize(
    "data,words",
    [
        (encode(1, OPEN, b"x" * 1025), "more than 1024"),
        (encode(1, HEAD, b"{}"), "unknown frame kind"),  # a breaker's kind, sent to it
        (encode(1, OPEN, b"ping\n")[:-1], "inside a frame"),
        (encode(1, OPEN, b"ping\n")[:5], "inside a frame header"),
        (b"\xff" * 9, "unknown frame kind"),
    ],
)
def test_oversized_unknown_and_cut_frames_are_framing_errors(data, words):
    with pytest.raises(FramingError, match=words):
        frames(data)


def test_an_empty_stream_has_no_frames():
    assert frames(b"") == []
