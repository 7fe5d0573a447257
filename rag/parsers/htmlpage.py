"""HTML: visible text as paragraphs and table rows under h1-h6; scripts, styles, navigation go."""

from __future__ import annotations

from html.parser import HTMLParser

from appliance.rag.document import Section
from appliance.rag.limits import IngestLimits
from appliance.rag.parsers.outline import Outline
from appliance.rag.parsers.tables import row_sections
from appliance.rag.sniff import decode_text

# Elements whose content is not part of the document's text. Not <head>: its end tag is
# optional, and a page that omits it would lose its whole body.
_SKIPPED = {"script", "style", "title", "nav", "noscript", "template", "svg", "iframe"}
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
# Elements that end a run of text: each gives its own paragraph.
_BLOCKS = {
    "p",
    "div",
    "section",
    "article",
    "main",
    "aside",
    "header",
    "footer",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "br",
    "hr",
    "figure",
    "figcaption",
    "address",
    "details",
    "summary",
    "caption",
}
_CELLS = {"td", "th"}


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """The visible text of an HTML page."""
    extractor = _TextExtractor()
    extractor.feed(decode_text(data))
    extractor.close()
    return extractor.sections


class _TextExtractor(HTMLParser):
    """Collects text runs; a block, heading or table boundary ends the current run."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self._outline = Outline()
        self._skip_depth = 0
        self._text: list[str] = []
        self._table: list[list[str]] | None = None
        self._tables_open = 0
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip_depth += 1
        elif self._skip_depth:
            return
        elif tag == "table":
            self._tables_open += 1
            if self._tables_open == 1:  # a nested table's cells join the outer table's cells
                self._flush_paragraph()
                self._table = []
        elif self._table is not None:
            if tag == "tr":
                self._end_cell()
                self._table.append([])
            elif tag in _CELLS:
                self._end_cell()
                self._take_text()  # whitespace between cells
                self._in_cell = True
        elif tag in _HEADINGS or tag in _BLOCKS:
            self._flush_paragraph()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif self._skip_depth:
            return
        elif tag == "table" and self._tables_open:
            self._tables_open -= 1
            if not self._tables_open:
                self._end_table()
        elif self._table is not None:
            if tag in _CELLS or tag == "tr":
                self._end_cell()
        elif tag in _HEADINGS:
            title = self._take_text()
            if title:
                path = self._outline.enter(_HEADINGS[tag], title)
                self.sections.append(Section(title, kind="heading", heading_path=path))
        elif tag in _BLOCKS:
            self._flush_paragraph()

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._text.append(data)

    def close(self) -> None:
        super().close()
        if self._table is not None:
            self._end_table()
        self._flush_paragraph()

    def _take_text(self) -> str:
        text = " ".join("".join(self._text).split())
        self._text.clear()
        return text

    def _flush_paragraph(self) -> None:
        text = self._take_text()
        if text:
            self.sections.append(Section(text, heading_path=self._outline.path))

    def _end_cell(self) -> None:
        # Empty cells count too: they keep the columns under their headers.
        if self._table is not None and self._in_cell:
            if not self._table:
                self._table.append([])
            self._table[-1].append(self._take_text())
        self._in_cell = False

    def _end_table(self) -> None:
        self._end_cell()
        self._take_text()  # text between cells is markup whitespace
        rows, self._table = self._table or [], None
        self.sections.extend(row_sections(rows, heading_path=self._outline.path))
