"""Lines as SSE (ended by CRLF, LF or CR) and JSONL (by LF) define them, not str.splitlines()."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: at run time this needs only the standard library
    import httpx

# str.splitlines(), and httpx's iter_lines()/aiter_lines() that follow it, also break at U+2028,
# U+2029, U+0085, \v, \f and \x1c-\x1e. JSON written with ensure_ascii=False (vLLM, the gateway,
# the audit log) carries those raw inside strings, so a `data: {...}` line would be cut in two.
# Split as bytes: CR and LF never occur inside a UTF-8 encoded character, so each line decodes
# whole, however the chunks cut the stream.
_SSE_BREAK = re.compile(rb"\r\n|\r|\n")


class SSELineSplitter:
    """Complete lines of an SSE stream (UTF-8) fed in chunks as they arrive; empty lines are
    kept, since they end events."""

    def __init__(self) -> None:
        self._pending = b""  # the start of a line whose end has not come yet
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """The lines this chunk completes."""
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            # The last chunk ended at a CR, which ended its line at once (a stream that ends
            # lines with CR alone is not held up a chunk); this LF is the rest of that CRLF.
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        *lines, self._pending = _SSE_BREAK.split(self._pending + chunk)
        return [line.decode("utf-8", "replace") for line in lines]

    def end(self) -> list[str]:
        """A last line the stream left unterminated, if any (as httpx gives it)."""
        line, self._pending = self._pending, b""
        return [line.decode("utf-8", "replace")] if line else []


def iter_sse_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of a streamed SSE response: what `response.iter_lines()` should give."""
    splitter = SSELineSplitter()
    for chunk in response.iter_bytes():
        yield from splitter.feed(chunk)
    yield from splitter.end()


async def aiter_sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a streamed SSE response: what `response.aiter_lines()` should give."""
    splitter = SSELineSplitter()
    async for chunk in response.aiter_bytes():
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.end():
        yield line


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at LF only (a JSON string may hold U+2028 and the like
    raw), a CR before it dropped (files written on Windows); the final LF makes no empty line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]
