"""Malformed Office files (real zip bytes, real parsers) are refused one by one: whatever the
zip reader or python-docx raises becomes that file's refusal, and the other files go in."""

from __future__ import annotations

import pytest
from appliance.rag.ingest import parse_many

from tests.unit.rag_samples import ENCRYPTED, PPMD, docx_bytes, patched

CONTENT_TYPES = "[Content_Types].xml"


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
