"""Decide a file's type from its content; its name is never trusted."""

from __future__ import annotations

import codecs
import csv
import io
import re
import zipfile
from enum import StrEnum

from appliance.rag.errors import IngestError


class DocType(StrEnum):
    """The file types that can be ingested."""

    PDF = "pdf"
    DOCX = "docx"
    XLSX = "xlsx"
    PNG = "png"
    JPEG = "jpeg"
    HTML = "html"
    CSV = "csv"
    MARKDOWN = "markdown"
    TEXT = "text"


_MAGIC = [
    (b"%PDF-", DocType.PDF),
    (b"\x89PNG\r\n\x1a\n", DocType.PNG),
    (b"\xff\xd8\xff", DocType.JPEG),
]
_ZIP_MAGIC = b"PK\x03\x04"
# The main part's content type names the Office application; the part must also exist where
# python-docx and openpyxl look for it.
_OFFICE_PARTS = [
    (b"wordprocessingml.document.main+xml", "word/document.xml", DocType.DOCX),
    (b"spreadsheetml.sheet.main+xml", "xl/workbook.xml", DocType.XLSX),
]
_CONTENT_TYPES = "[Content_Types].xml"
_CONTENT_TYPES_MAX_BYTES = 1024 * 1024

_BOMS = [
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
# Text may hold a few stray control characters (a form feed, an escape); binary data has many.
_MAX_CONTROL_RATIO = 0.01
_ALLOWED_CONTROLS = set("\t\n\r\f\v")

_SAMPLE_CHARS = 64 * 1024
_SAMPLE_LINES = 20
_CSV_DELIMITERS = ",;\t"
_MARKDOWN = re.compile(
    r"^\#{1,6}[ \t]+\S"  # heading
    r"|^[ \t]*(?:[-*+]|\d+[.)])[ \t]+\S"  # list item
    r"|^[ \t]*(?:```|~~~)"  # fenced code
    r"|^[ \t]*\|?[ \t]*:?-+:?[ \t]*\|[-:| \t]*$"  # table header separator
    r"|\[[^\]\n]+\]\([^)\s]+\)",  # link
    re.MULTILINE,
)

UNSUPPORTED = "unsupported or binary content"


def sniff(data: bytes, filename: str) -> DocType:
    """The type of `data`; raises IngestError for empty, binary or unsupported content."""
    if not data:
        raise IngestError(filename, "the file is empty")
    for magic, doc_type in _MAGIC:
        if data.startswith(magic):
            return doc_type
    if data.startswith(_ZIP_MAGIC):
        return _sniff_office(data, filename)
    try:
        text = decode_text(data)
    except ValueError:
        raise IngestError(
            filename, f"{UNSUPPORTED} (text must be UTF-8, or UTF-16 with a byte order mark)"
        ) from None
    return _sniff_text(text)


def decode_text(data: bytes) -> str:
    """`data` as text: UTF-8, or UTF-8/UTF-16 with a byte order mark.

    Raises ValueError when it does not decode or holds too many control characters to be text.
    """
    encoding = "utf-8"
    for bom, bom_encoding in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom) :], bom_encoding
            break
    text = data.decode(encoding)  # UnicodeDecodeError is a ValueError
    sample = text[:_SAMPLE_CHARS]
    controls = sum(1 for c in sample if c < " " and c not in _ALLOWED_CONTROLS)
    if "\0" in sample or controls > _MAX_CONTROL_RATIO * len(sample):
        raise ValueError("control characters: binary data")
    return text


def csv_dialect(text: str) -> type[csv.Dialect] | None:
    """The CSV dialect of `text` when its first lines split consistently into >= 2 columns."""
    sample = "".join(text[:_SAMPLE_CHARS].splitlines(keepends=True)[:_SAMPLE_LINES])
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=_CSV_DELIMITERS)
    except csv.Error:
        return None
    rows = [row for row in csv.reader(io.StringIO(sample), dialect) if row]
    if len(sample) < len(text):
        rows = rows[:-1]  # the sample may end inside a row
    widths = {len(row) for row in rows}
    return dialect if len(rows) >= 2 and len(widths) == 1 and widths.pop() >= 2 else None


def _sniff_text(text: str) -> DocType:
    head = text.lstrip()[:64].lower()
    if head.startswith(("<!doctype html", "<html")):
        return DocType.HTML
    if csv_dialect(text):
        return DocType.CSV
    if _MARKDOWN.search(text[:_SAMPLE_CHARS]):
        return DocType.MARKDOWN
    return DocType.TEXT


def _sniff_office(data: bytes, filename: str) -> DocType:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            if _CONTENT_TYPES not in names:
                raise IngestError(filename, f"{UNSUPPORTED} (a zip archive, not a DOCX or XLSX)")
            # Read no more than a sane amount: this member could itself be a zip bomb.
            with archive.open(_CONTENT_TYPES) as member:
                content_types = member.read(_CONTENT_TYPES_MAX_BYTES)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise IngestError(filename, f"a damaged zip archive ({exc})") from None
    except (RuntimeError, NotImplementedError) as exc:
        # zipfile's words for an encrypted member, and for a compression method it lacks.
        raise IngestError(
            filename, f"an encrypted zip archive, or one compressed in a way not supported ({exc})"
        ) from None
    for content_type, part, doc_type in _OFFICE_PARTS:
        if content_type in content_types and part in names:
            return doc_type
    raise IngestError(filename, f"{UNSUPPORTED} (an Office file that is neither DOCX nor XLSX)")
