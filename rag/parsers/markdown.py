"""Markdown: paragraphs, code blocks and tables under the heading path they belong to."""

from __future__ import annotations

import re

from appliance.rag.document import Section
from appliance.rag.limits import IngestLimits
from appliance.rag.parsers.outline import Outline
from appliance.rag.parsers.tables import row_sections
from appliance.rag.sniff import decode_text

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_TABLE_SEPARATOR = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """The sections of a Markdown file, each with its heading path."""
    return parse_markdown(decode_text(data))


def parse_markdown(text: str) -> list[Section]:
    """Sections of Markdown `text`: headings (ATX and setext), paragraphs, code, table rows."""
    outline = Outline()
    sections: list[Section] = []
    block: list[str] = []
    code: list[str] = []
    fence: str | None = None

    def flush() -> None:
        if block:
            sections.extend(_block_sections(block, outline.path))
            block.clear()

    def heading(level: int, title: str) -> None:
        sections.append(Section(title, kind="heading", heading_path=outline.enter(level, title)))

    for line in text.splitlines():
        if fence is not None:
            if line.strip().startswith(fence):
                sections.append(Section("\n".join(code), kind="code", heading_path=outline.path))
                code.clear()
                fence = None
            else:
                code.append(line)
        elif match := _FENCE.match(line):
            flush()
            fence = match.group(1)
        elif match := _ATX_HEADING.match(line):
            flush()
            heading(len(match.group(1)), match.group(2))
        elif match := _SETEXT_UNDERLINE.match(line):
            # Under a paragraph it makes that paragraph a heading; alone, "---" is a rule.
            if block:
                title = " ".join(part.strip() for part in block)
                block.clear()
                heading(1 if match.group(1)[0] == "=" else 2, title)
        elif line.strip():
            block.append(line)
        else:
            flush()
    if code:  # a fence left open runs to the end of the file
        sections.append(Section("\n".join(code), kind="code", heading_path=outline.path))
    flush()
    return [s for s in sections if s.text.strip()]


def _block_sections(lines: list[str], heading_path: tuple[str, ...]) -> list[Section]:
    if len(lines) >= 2 and "|" in lines[0] and _TABLE_SEPARATOR.match(lines[1]):
        rows = [_cells(line) for i, line in enumerate(lines) if i != 1]
        return row_sections(rows, heading_path=heading_path)
    return [Section("\n".join(lines), heading_path=heading_path)]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
