"""XLSX with openpyxl, streamed: each row labelled with its sheet's header row."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable, Iterator

from appliance.rag.document import Section
from appliance.rag.limits import CellBudget, IngestLimits, check_zip
from appliance.rag.parsers.tables import row_sections


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """Rows of every worksheet (cached values, not formulas); cells counted as they stream."""
    import openpyxl

    check_zip(filename, data, limits)
    budget = CellBudget(filename, limits)
    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sections: list[Section] = []
        for sheet in workbook.worksheets:
            rows = _rows(sheet.iter_rows(values_only=True), budget)
            sections.extend(row_sections(rows, sheet=sheet.title))
        return sections
    finally:
        workbook.close()


def _rows(rows: Iterable[tuple[object, ...]], budget: CellBudget) -> Iterator[list[str]]:
    for row in rows:
        budget.spend(len(row))
        yield [_cell_text(value) for value in row]


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 3.0 -> "3": Excel stores every number as a float
    if isinstance(value, dt.datetime) and value.time() == dt.time():
        return value.date().isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)
