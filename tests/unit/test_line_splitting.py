"""Lines of SSE streams and JSONL texts: only CRLF, LF or CR (SSE) and LF (JSONL) end them, not
the Unicode line breaks str.splitlines() and httpx's iter_lines() also split at."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from appliance.lines import SSELineSplitter, aiter_sse_lines, iter_sse_lines, jsonl_lines

# Where splitlines() also breaks. JSON written with ensure_ascii=False carries the first three
# raw inside strings; the control characters are escaped by json.dumps, yet a lenient writer or
# reader (strict=False) lets them through too.
UNICODE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"


def split(*chunks: bytes) -> list[str]:
    splitter = SSELineSplitter()
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.end()


def event(text: str) -> str:
    """A data line with `text` raw in a JSON string (json.dumps would escape control characters)."""
    return 'data: {"t": "' + text + '"}'


@pytest.mark.parametrize("char", list(UNICODE_BREAKS))
def test_a_unicode_line_break_inside_a_json_string_stays_in_its_line(char):
    line = event(f"a{char}b")
    assert line.splitlines() != [line]  # what the bug did
    assert split((line + "\n\n").encode()) == [line, ""]
    assert json.loads(split((line + "\n").encode())[0][6:], strict=False) == {"t": f"a{char}b"}


def test_crlf_lf_and_cr_end_lines_and_empty_lines_are_kept():
    assert split(b"a\r\nb\nc\rd\r\n\r\ne\n\n") == ["a", "b", "c", "d", "", "e", ""]
    assert split(b"data: 1\n\ndata: 2\n\n") == ["data: 1", "", "data: 2", ""]
    assert split(b"\n\n") == ["", ""]
    assert split(b"") == [] and split(b"a") == ["a"]  # an unterminated last line still comes


def test_a_crlf_cut_between_chunks_is_one_line_end():
    assert split(b"a\r", b"\nb\r\n") == ["a", "b"]
    assert split(b"a\r", b"\n", b"\r", b"\n") == ["a", ""]  # CRLF, then an empty line
    assert split(b"a\r", b"", b"\nb\n") == ["a", "b"]  # an empty chunk changes nothing
    assert split(b"a\r", b"\rb\n") == ["a", "", "b"]  # CR CR: two line ends


def test_a_line_ended_by_cr_alone_comes_without_waiting_for_the_next_chunk():
    splitter = SSELineSplitter()
    assert splitter.feed(b"data: 1\r") == ["data: 1"]
    assert splitter.feed(b"\r") == [""]


def test_lines_and_characters_cut_across_chunks_are_put_together():
    data = (event("x\u2028y\u0085z") + "\r\n\r\n").encode()
    every_cut = [split(data[:i], data[i:]) for i in range(len(data) + 1)]
    assert all(lines == [event("x\u2028y\u0085z"), ""] for lines in every_cut)
    assert split(*(data[i : i + 1] for i in range(len(data)))) == every_cut[0]


def test_httpx_responses_sync_and_async():
    line = event("a\u2028b\u0085c\x0cd")
    chunks = [line[:10].encode(), (line[10:] + "\r").encode(), b"\n\ndata: [DONE]\n\n"]
    expected = [line, "", "data: [DONE]", ""]

    assert list(iter_sse_lines(httpx.Response(200, content=iter(chunks)))) == expected

    async def stream():
        for chunk in chunks:
            yield chunk

    async def read() -> list[str]:
        return [line async for line in aiter_sse_lines(httpx.Response(200, content=stream()))]

    assert asyncio.run(read()) == expected


def test_jsonl_lines_split_at_lf_only():
    rows = [event(f"a{c}b")[6:] for c in UNICODE_BREAKS]
    text = "\n".join(rows) + "\n"
    assert jsonl_lines(text) == rows
    assert jsonl_lines("a\r\nb\r\n") == ["a", "b"]  # written on Windows
    assert jsonl_lines("a\n\nb") == ["a", "", "b"]  # blank lines keep the numbering true
    assert jsonl_lines("") == [] and jsonl_lines("\n") == [""]
