"""Malformed Office files (real zip bytes, real parsers) are refused one by one: whatever the
zip reader or python-docx raises becomes that file's refusal, and the other files go in."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
from appliance.rag.ingest import parse_many

from tests.unit.rag_samples import docx_bytes

CONTENT_TYPES = "[Content_Types].xml"
PPMD = 98  # a compression method Python's zipfile cannot read
ENCRYPTED = 0x1  # general purpose flag bit 0


def patched(data: bytes, member: str, *, method: int | None = None, flags: int = 0) -> bytes:
    """`data` with `member`'s compression method and flags changed in both of its headers, the
    local one and the central directory's, as a hostile client could send them."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        local = archive.getinfo(member).header_offset
    _patch(out, local, flags_at=6, method_at=8, method=method, flags=flags)
    central = out.find(b"PK\x01\x02")
    while central != -1:
        (name_len,) = struct.unpack_from("<H", out, central + 28)
        if bytes(out[central + 46 : central + 46 + name_len]) == member.encode():
            _patch(out, central, flags_at=8, method_at=10, method=method, flags=flags)
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def _patch(out: bytearray, at: int, *, flags_at: int, method_at: int, method, flags) -> None:
    (old_flags,) = struct.unpack_from("<H", out, at + flags_at)
    struct.pack_into("<H", out, at + flags_at, old_flags | flags)
    if method is not None:
        struct.pack_into("<H", out, at + method_at, method)


@pytest.mark.parametrize(
    ("member", "change", "reason"),
    [
        (CONTENT_TYPES, {"method": PPMD}, "compressed in a way not supported"),
        (CONTENT_TYPES, {"flags": ENCRYPTED}, "an encrypted zip archive"),
        ("word/document.xml", {"method": PPMD}, "a damaged or unreadable DOCX file"),
        ("word/document.xml", {"flags": ENCRYPTED}, "a damaged or unreadable DOCX file"),
    ],
)
def test_a_bad_docx_is_refused_alone(member, change, reason):
    bad = patched(docx_bytes(), member, **change)
    documents, errors = parse_many(
        [(b"First file.\n", "first.txt"), (bad, "bad.docx"), (docx_bytes(), "good.docx")]
    )
    assert [d.filename for d in documents] == ["first.txt", "good.docx"]
    [error] = errors
    assert error.filename == "bad.docx"
    assert reason in str(error)
