"""File types are decided by content: magic numbers, zip parts, text structure; never the name."""

from __future__ import annotations

import codecs
import io
import random
import zipfile

import pytest
from appliance.rag.errors import IngestError
from appliance.rag.sniff import DocType, sniff

from tests.unit.rag_samples import docx_bytes, image_bytes, text_pdf, xlsx_bytes

CSV = b"name,age,city\nAnn,31,Oslo\nBob,42,Rome\n"
MARKDOWN_HEADING = b"# Title\n\nSome text, with a comma.\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (text_pdf([["Hello"]]), DocType.PDF),
        (image_bytes(["x"], "PNG"), DocType.PNG),
        (image_bytes(["x"], "JPEG"), DocType.JPEG),
        (docx_bytes(), DocType.DOCX),
        (xlsx_bytes({"Sheet": [["a", "b"]]}), DocType.XLSX),
        (b"\n  <!DOCTYPE HTML>\n<html><body>Hi</body></html>", DocType.HTML),
        (codecs.BOM_UTF8 + b"<html lang='en'><p>Hi</p></html>", DocType.HTML),
        (codecs.BOM_UTF16_LE + "<HTML><p>Hi</p></HTML>".encode("utf-16-le"), DocType.HTML),
        (CSV, DocType.CSV),
        (b"name;age\nAnn;31\nBob;42\n", DocType.CSV),
        (b"name\tage\nAnn\t31\nBob\t42\n", DocType.CSV),
        (b'id,comment\n1,"hello, world"\n2,"line one\nline two"\n3,ok\n', DocType.CSV),
        (MARKDOWN_HEADING, DocType.MARKDOWN),
        (b"Shopping:\n\n- eggs\n- milk\n", DocType.MARKDOWN),
        (b"See [the docs](https://example.org/docs) first.\n", DocType.MARKDOWN),
        (b"Example:\n\n```\nls -l\n```\n", DocType.MARKDOWN),
        # A Markdown table has consistent '|' columns, but it is not CSV.
        (b"| a | b |\n|---|---|\n| 1 | 2 |\n", DocType.MARKDOWN),
        (b"Just a note.\nNothing special here, really.\nThe end.\n", DocType.TEXT),
        (codecs.BOM_UTF8 + "Grüße aus Köln.\n".encode(), DocType.TEXT),
        (codecs.BOM_UTF16_BE + "Plain UTF-16 text.\n".encode("utf-16-be"), DocType.TEXT),
    ],
)
def test_types_from_content(data: bytes, expected: DocType):
    assert sniff(data, "upload.bin") == expected


def test_the_name_is_ignored():
    assert sniff(text_pdf([["Hello"]]), "notes.txt") == DocType.PDF
    assert sniff(b"Plain words.\n", "report.pdf") == DocType.TEXT


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (random.Random(0).randbytes(4096), "unsupported or binary content"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, "unsupported or binary content"),
        ("Caf\u00e9 au lait\n".encode("latin-1"), "text must be UTF-8"),
        ("UTF-16 without a BOM".encode("utf-16-le"), "unsupported or binary content"),
        (_zip({"readme.txt": b"hi"}), "a zip archive, not a DOCX or XLSX"),
        (
            _zip({"[Content_Types].xml": b"<Types/>", "ppt/presentation.xml": b"<p/>"}),
            "neither DOCX nor XLSX",
        ),
        (b"PK\x03\x04" + bytes(100), "a damaged zip archive"),
        (b"", "the file is empty"),
    ],
)
def test_binary_and_unsupported_content_is_refused(data: bytes, reason: str):
    with pytest.raises(IngestError, match=reason) as caught:
        sniff(data, "upload.pdf")
    assert str(caught.value).startswith("upload.pdf: refused: ")
