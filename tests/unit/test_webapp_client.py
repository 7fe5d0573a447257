"""The web app's gateway client reading a streamed chat answer over HTTP (an httpx mock transport
in the gateway's place), with the bytes cut into chunks as a network would cut them."""

from __future__ import annotations

import asyncio
import json

import httpx

from appliance.webapp.client import ChatEvent, GatewayClient

# A model's answer with Unicode line breaks that httpx's aiter_lines() split at (U+2028 LINE
# SEPARATOR, U+0085 NEXT LINE): vLLM and the gateway write them raw (ensure_ascii=False).
ANSWER = "First line\u2028second line\u0085third line"


def chunk(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    data = {"object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def stream_events(body: bytes, cuts: list[int]) -> tuple[list[ChatEvent], httpx.Request]:
    """What chat_stream yields for a gateway that answers `body`, sent in pieces cut at `cuts`."""
    seen: list[httpx.Request] = []

    async def pieces():
        for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
            yield body[start:end]

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, content=pieces())

    async def read() -> list[ChatEvent]:
        client = GatewayClient("http://gateway", transport=httpx.MockTransport(gateway))
        try:
            body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
            return [event async for event in client.chat_stream("t-alice", body)]
        finally:
            await client.aclose()

    events = asyncio.run(read())
    return events, seen[0]


def test_an_answer_with_unicode_line_breaks_comes_whole():
    body = b"".join(
        [
            b": waiting for an instance of tiny-chat\n\n",
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": ANSWER}),
            chunk({}, "stop"),
            b"data: [DONE]\n\n",
        ]
    )
    separator = body.index("\u2028".encode())
    # Cut inside U+2028's three bytes, and everywhere else by a few bytes at a time.
    events, request = stream_events(body, sorted({separator + 1, *range(7, len(body), 13)}))
    assert [e.kind for e in events] == ["waiting", "delta", "delta", "delta", "done"]
    assert "".join(e.text for e in events if e.kind == "delta") == ANSWER
    assert events[3].data["finish_reason"] == "stop"
    assert request.headers["authorization"] == "Bearer t-alice"
    assert json.loads(request.content)["stream"] is True


def test_an_answer_sent_with_crlf_line_ends_cut_between_cr_and_lf():
    body = chunk({"content": ANSWER}).replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
    cut = body.index(b"\r\n") + 1
    events, _ = stream_events(body, [cut])
    assert [(e.kind, e.text) for e in events] == [("delta", ANSWER), ("done", "")]
