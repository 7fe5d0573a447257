"""DOCX with python-docx: paragraphs under their headings, and tables row by row."""

from __future__ import annotations

import io
import re

from appliance.rag.document import Section
from appliance.rag.limits import IngestLimits, check_zip
from appliance.rag.parsers.outline import Outline
from appliance.rag.parsers.tables import row_sections

_HEADING_STYLE = re.compile(r"Heading (\d)$")


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """Body paragraphs and tables of a Word document, in reading order."""
    import docx
    from docx.table import Table

    check_zip(filename, data, limits)
    document = docx.Document(io.BytesIO(data))
    outline = Outline()
    sections: list[Section] = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            rows = [[cell.text for cell in row.cells] for row in block.rows]
            sections.extend(row_sections(rows, heading_path=outline.path))
            continue
        text = block.text.strip()
        if not text:
            continue
        level = _heading_level(block.style.name if block.style else "")
        if level:
            sections.append(Section(text, kind="heading", heading_path=outline.enter(level, text)))
        else:
            sections.append(Section(text, heading_path=outline.path))
    return sections


def _heading_level(style_name: str) -> int | None:
    """1 for "Title" and "Heading 1", N for "Heading N"; None for body styles."""
    if style_name == "Title":
        return 1
    match = _HEADING_STYLE.match(style_name)
    return int(match.group(1)) if match else None
