"""What a parser makes of a file: its text as sections that know where they came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.rag.sniff import DocType

SectionKind = Literal["heading", "paragraph", "table_row", "code"]

_HEADING_SEPARATOR = " > "


@dataclass(frozen=True)
class Section:
    """One block of text with its place in the file: page, sheet and heading path."""

    text: str
    kind: SectionKind = "paragraph"
    page: int | None = None
    """1-based page number (PDF)."""
    sheet: str | None = None
    """Worksheet name (XLSX)."""
    heading_path: tuple[str, ...] = ()
    """Headings above this section, outermost first; a heading's own path ends with itself."""

    @property
    def heading(self) -> str | None:
        """The heading path as one string, e.g. "Install > Linux"; None outside any heading."""
        return _HEADING_SEPARATOR.join(self.heading_path) or None


@dataclass(frozen=True)
class ParsedDocument:
    """A file's text in reading order, as parsed from its content."""

    filename: str
    doc_type: DocType
    sections: list[Section]
    source_hash: str | None = None
    """sha256 (hex) of the file as it was read."""
