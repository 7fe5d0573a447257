"""Table rows as text that stands on its own: "header: value; header: value"."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

from appliance.rag.document import Section


def format_row(headers: Sequence[str], values: Sequence[str]) -> str:
    """`values` labelled with their column headers; empty cells are left out."""
    pairs = []
    for i, value in enumerate(values):
        value = " ".join(value.split())
        if value:
            header = " ".join(headers[i].split()) if i < len(headers) else ""
            pairs.append(f"{header or f'column {i + 1}'}: {value}")
    return "; ".join(pairs)


def row_sections(
    rows: Iterable[Sequence[str]],
    sheet: str | None = None,
    heading_path: tuple[str, ...] = (),
) -> list[Section]:
    """One section per row; the first row with any text is the header row.

    A table that is nothing but its header row still gives that row, so no text is lost.
    """
    row_section = partial(Section, kind="table_row", sheet=sheet, heading_path=heading_path)
    headers: Sequence[str] | None = None
    sections = []
    for row in rows:
        if headers is None:
            if any(cell.strip() for cell in row):
                headers = row
            continue
        text = format_row(headers, row)
        if text:
            sections.append(row_section(text))
    if headers is not None and not sections:
        text = "; ".join(" ".join(cell.split()) for cell in headers if cell.strip())
        sections.append(row_section(text))
    return sections
