"""Plain text: paragraphs separated by blank lines."""

from __future__ import annotations

import re

from appliance.rag.document import Section
from appliance.rag.limits import IngestLimits
from appliance.rag.sniff import decode_text

_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """The paragraphs of a UTF-8 (or UTF-16 with BOM) text file."""
    return paragraphs(decode_text(data))


def paragraphs(text: str, page: int | None = None) -> list[Section]:
    """`text` split at blank lines into paragraph sections; also used for PDF pages and OCR."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [
        Section(block.strip(), page=page) for block in _BLANK_LINES.split(text) if block.strip()
    ]
