"""One parser per file type; each turns a file's bytes into sections in reading order."""

from __future__ import annotations

from collections.abc import Callable

from appliance.rag.document import Section
from appliance.rag.limits import IngestLimits
from appliance.rag.parsers import csvfile, excel, htmlpage, image, markdown, pdf, plaintext, word
from appliance.rag.sniff import DocType

Parser = Callable[[bytes, str, IngestLimits], list[Section]]

PARSERS: dict[DocType, Parser] = {
    DocType.PDF: pdf.parse,
    DocType.DOCX: word.parse,
    DocType.XLSX: excel.parse,
    DocType.CSV: csvfile.parse,
    DocType.TEXT: plaintext.parse,
    DocType.MARKDOWN: markdown.parse,
    DocType.HTML: htmlpage.parse,
    DocType.PNG: image.parse,
    DocType.JPEG: image.parse,
}
"""Parser of each type: `parse(data, filename, limits)` raises IngestError for refused files."""
